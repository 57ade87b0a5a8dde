"""Print the model cards of checkpoints as a Markdown table: `python -m sdnet.cards_table [CKPT ...]`.

(A module of its own: `python -m sdnet.cards` would import the cards module twice.)"""
import argparse
import glob
import os

from .cards import markdown_table

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m sdnet.cards_table", description=__doc__.split(":")[0])
    parser.add_argument("checkpoints", nargs="*", help="checkpoint files (default: checkpoints/*.pt)")
    args = parser.parse_args()
    found = args.checkpoints or sorted(glob.glob("checkpoints/*.pt"))
    if not found:  # run elsewhere than the repository root, it printed a header and nothing else, with status 0
        raise SystemExit(f"error: no checkpoints/*.pt under {os.getcwd()}: run it from the repository root, or "
                         "name checkpoint files")
    print(markdown_table(found))
    missing = [path for path in args.checkpoints if not os.path.exists(path)]
    if missing:  # in the table too, but a script should not take the table for a success
        raise SystemExit(f"error: no such file: {', '.join(missing)}")
