"""SDNet Explorer: `streamlit run app/main.py`.

The page, top to bottom: a model (sidebar), an image and its corruption (sidebar), the clean
and corrupted inputs, then the live part that lambda drives: predictions, per-layer residuals
and codes, atoms, attribution and export. The app only calls `sdnet` and plots.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `streamlit run app/main.py` puts app/ on the path, not the repo
    sys.path.insert(0, str(ROOT))

import streamlit as st  # noqa: E402
import torch  # noqa: E402

from app import panels, state  # noqa: E402

st.set_page_config(page_title="SDNet Explorer", page_icon=":mag:", layout="wide")
st.title("SDNet Explorer")
st.caption("Look inside a network whose convolutions are convolutional sparse coding layers "
           "(Dai et al., *Revisiting Sparse Convolutional Model for Visual Recognition*, NeurIPS 2022): "
           "each layer outputs the sparse code z minimising λ‖z‖₁ + ½‖x − A(z)‖².")

panels.keep_state()
panels.address_in()  # a reload, a shared link, Back or Forward: the address's settings
torch.set_num_threads(state.cpu_threads())
device = state.pick_device()
loaded, baseline = panels.model_sidebar(device)
clean, image_info, upload = panels.image_sidebar(loaded.input_size)
corruption = panels.corruption_sidebar()
if clean is None:  # no usable upload, said on the page; the noise controls stay in the sidebar
    st.stop()
image = state.corrupted(clean, corruption["kind"], corruption["severity"], corruption["seed"] or 0)

st.markdown(f"**{loaded.title}** from `{loaded.path.name}` on **{state.device_label(device)}**")
panels.show_inputs(clean, image, image_info, corruption, upload)
panels.reset_on_model_change(loaded)
panels.address_in(loaded)
panels.explore(panels.Context(loaded=loaded, baseline=baseline, clean=clean, image=image, image_info=image_info,
                              corruption=corruption, device=state.device_label(device)))
