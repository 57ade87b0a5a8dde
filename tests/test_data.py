"""sdnet.data: the three sources, the decode cache, clear errors, and the augmentation."""
import io
import re
import shutil
import tarfile

import pytest
import torch
from helpers import CLASSES, make_image_folder

from sdnet.data import DatasetError, augment, load_split, resolve_data_path


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SDNET_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("SDNET_DATA", raising=False)


def test_image_folder_loads_images_labels_and_classes(tmp_path):
    root = make_image_folder(tmp_path / "tree", n_train=3, n_test=2)
    train = load_split(root, "train")
    assert train.images.shape == (9, 3, 32, 32) and train.images.dtype == torch.uint8
    assert train.classes == CLASSES[:3]
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    # class-dependent brightness survives decoding
    assert train.images[train.labels == 2].float().mean() > train.images[train.labels == 0].float().mean() + 50
    assert len(load_split(root, "test")) == 6
    upper = make_image_folder(tmp_path / "upper", n_train=3, n_test=1, suffix=".PNG")  # a camera's IMG_0001.JPG
    assert len(load_split(upper, "train")) == 9


def test_a_tree_of_more_classes_than_the_model_predicts_is_refused(tmp_path):
    from sdnet.data import align_classes
    many = load_split(make_image_folder(tmp_path / "many", n_train=1, n_test=1,
                                        classes=[f"class{i:02d}" for i in range(11)]), "train", "cifar100")
    with pytest.raises(DatasetError, match="the model predicts 10 classes; .* has 11"):
        align_classes(many, None, 10)
    assert align_classes(many, None, 11) is many  # as many as it predicts: as it is
    # fewer, and no names to match them by: their sorted folders' indices were taken for the model's classes (a cat
    # and dog folder scored 0% against a model that gets 75% of them, unsaid)
    with pytest.raises(DatasetError, match=r"no class names, so the 11 class folder\(s\) of .* \(class00, class01, "
                                           r"class02, class03, class04, \.\.\.\) cannot be matched to its 12 classes"):
        align_classes(many, None, 12)


def test_a_tree_must_fit_the_dataset_it_is_named_as(tmp_path):
    # the name goes on the model card: CIFAR-10's classes trained "as cifar100" made a card that lied
    root = make_image_folder(tmp_path / "tree", n_train=1, n_test=1)
    assert load_split(root, "train", "cifar10").classes == CLASSES[:3]  # some of CIFAR-10's classes: fine
    with pytest.raises(DatasetError, match="CIFAR-10's classes .* pass --dataset cifar10"):
        load_split(root, "train", "cifar100")
    many = make_image_folder(tmp_path / "many", n_train=1, n_test=1, classes=[f"class{i:02d}" for i in range(11)])
    with pytest.raises(DatasetError, match="has 11 classes, more than cifar10's 10"):
        load_split(many, "train", "cifar10")
    assert len(load_split(many, "train", "cifar100").classes) == 11


def test_second_load_uses_the_decode_cache(tmp_path, monkeypatch):
    root = make_image_folder(tmp_path / "tree")
    first = load_split(root, "train")
    assert list((tmp_path / "cache" / "decoded").glob("*.npz"))
    import sdnet.data as data
    monkeypatch.setattr(data, "_decode_all", lambda files: pytest.fail("decoded JPEGs again"))
    assert torch.equal(load_split(root, "train").images, first.images)


def test_a_plain_tar_loads_and_a_half_removed_copy_is_replaced(tmp_path):
    root = make_image_folder(tmp_path / "tree" / "cifar10-jpg", n_train=2, n_test=1)
    archive = tmp_path / "cifar.tar"  # uncompressed
    with tarfile.open(archive, "w") as tar:
        tar.add(root, arcname="cifar10-jpg")
    assert len(load_split(archive, "train")) == 6
    # a copy a pruning could not finish removing (no .complete mark, a stray file): unpacked afresh over it
    (unpacked,) = [p for p in (tmp_path / "cache" / "unpacked").iterdir() if p.is_dir()]
    (unpacked / ".complete").unlink()
    (unpacked / "stray.txt").write_text("left over")
    shutil.rmtree(tmp_path / "cache" / "decoded")
    assert len(load_split(archive, "test")) == 3 and not (unpacked / "stray.txt").exists()


def test_an_archive_without_the_split_is_named_in_the_error(tmp_path):
    """The error named only the cache's unpacked copy, a folder the user never saw, not the archive they gave."""
    root = make_image_folder(tmp_path / "tree" / "only", n_train=1, n_test=1)
    shutil.rmtree(root / "test")
    archive = tmp_path / "wrong.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root, arcname="only")
    with pytest.raises(DatasetError, match=f"the archive {re.escape(str(archive))}, unpacked: no 'test' folder in "):
        load_split(archive, "test")
    assert len(load_split(archive, "train")) == 3
    # an archive of something else altogether: refused, and its unpacked copy not kept in the cache for good
    other = tmp_path / "photos.tar.gz"
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.txt").write_text("not a dataset")
    with tarfile.open(other, "w:gz") as tar:
        tar.add(tmp_path / "photos", arcname="photos")
    with pytest.raises(DatasetError, match=f"^the archive {re.escape(str(other))} holds no ImageFolder tree .* and no "
                                           "torchvision CIFAR folder$"):  # (not the copy it removed)
        load_split(other, "train")
    assert [p.name.split("-")[0] for p in (tmp_path / "cache" / "unpacked").iterdir()] == ["wrong"]
    # torchvision's CIFAR-100 archive read as CIFAR-10: said so, and its copy kept (it was removed, then unpacked
    # again on each try)
    (tmp_path / "c100" / "cifar-100-python").mkdir(parents=True)
    (tmp_path / "c100" / "cifar-100-python" / "meta").write_bytes(b"x")
    c100 = _archive(tmp_path / "c100" / "cifar-100-python", tmp_path / "cifar-100-python.tar.gz")
    for _ in range(2):
        with pytest.raises(DatasetError, match="holds torchvision's cifar100, not cifar10: pass --dataset cifar100$"):
            load_split(c100, "train")
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "cache" / "unpacked").iterdir()) == ["cifar", "wrong"]


def test_a_damaged_archive_is_refused_not_unpacked_in_part(tmp_path):
    """tarfile takes a damaged header part-way for the archive's end and says nothing: a small archive trained on
    380 of its 400 images, and CIFAR-10's with 64 bytes flipped unpacked 28,266 of 59,000 files, kept as complete.
    Nor was gzip's checksum at the end read."""
    import gzip
    root = make_image_folder(tmp_path / "tree" / "cifar10-jpg", n_train=4, n_test=1)
    raw = bytearray(gzip.decompress(_archive(root, tmp_path / "good.tar.gz").read_bytes()))
    with tarfile.open(fileobj=io.BytesIO(bytes(raw))) as tar:
        members = tar.getmembers()
    header = members[len(members) // 2].offset
    raw[header + 148:header + 156] = b"0000000\0"  # its header's checksum, wrong: tarfile stops there
    damaged = tmp_path / "damaged.tar.gz"
    damaged.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(DatasetError, match=rf"cannot unpack {re.escape(str(damaged))}: the archive is damaged: it "
                                           rf"stops being readable after {len(members) // 2} file"):
        load_split(damaged, "train")
    assert not list((tmp_path / "cache" / "unpacked").iterdir())  # nothing kept as complete, no scratch
    # a wrong checksum at gzip's end (the members all read well before it)
    good = bytearray(gzip.compress(bytes(gzip.decompress((tmp_path / "good.tar.gz").read_bytes()))))
    good[-8] ^= 0xFF
    (bad_crc := tmp_path / "crc.tar.gz").write_bytes(bytes(good))
    with pytest.raises(DatasetError, match="cannot unpack .*crc.tar.gz: CRC check failed"):
        load_split(bad_crc, "train")
    assert len(load_split(tmp_path / "good.tar.gz", "train")) == 12


def test_ctrl_c_while_unpacking_leaves_no_scratch_folder(tmp_path, monkeypatch):
    root = make_image_folder(tmp_path / "tree" / "cifar10-jpg", n_train=1, n_test=1)
    archive = _archive(root, tmp_path / "cifar.tar.gz")
    real = tarfile.TarFile.extractall

    def interrupted(self, path, *a, **k):  # some files out, then Ctrl-C
        real(self, path, members=self.getmembers()[:3], filter="data")
        raise KeyboardInterrupt
    monkeypatch.setattr(tarfile.TarFile, "extractall", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load_split(archive, "train")
    assert not list((tmp_path / "cache" / "unpacked").iterdir())  # (it stayed, pruned only a day later)
    monkeypatch.setattr(tarfile.TarFile, "extractall", real)  # (not undo(): the cache's env var is patched too)
    assert len(load_split(archive, "train")) == 3


def test_tarball_is_unpacked_once(tmp_path, monkeypatch):
    root = make_image_folder(tmp_path / "tree" / "cifar10-jpg")
    archive = tmp_path / "cifar.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root, arcname="cifar10-jpg")
    monkeypatch.setenv("SDNET_DATA", str(archive))   # location from the environment
    test = load_split(None, "test")
    assert len(test) == 6 and test.classes == CLASSES[:3]
    import sdnet.data as data
    monkeypatch.setattr(data.tarfile, "open", lambda *a, **k: pytest.fail("unpacked twice"))
    assert len(load_split(archive, "train")) == 12
    # the same bytes copied elsewhere, with a new modification time (a restored or re-provisioned data folder):
    # neither unpacked nor decoded again, and the cache holds one copy
    copy = tmp_path / "elsewhere" / "cifar.tar.gz"
    copy.parent.mkdir()
    copy.write_bytes(archive.read_bytes())
    monkeypatch.setattr(data, "_decode_all", lambda files: pytest.fail("decoded again"))
    assert torch.equal(load_split(copy, "test").images, test.images)
    assert len(list((tmp_path / "cache" / "unpacked").iterdir())) == 1


def _archive(root, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        tar.add(root, arcname=root.name)
    return path


def test_the_cache_keeps_one_copy_per_source(tmp_path):
    """Nothing pruned the cache: a new archive at the same path, or edited images, left the older copies (5 GB of
    them on the machine this was built on). A changed source now replaces its copy; a copy still serving another
    path stays, and copies made before copies named their sources, or being written, are left alone."""
    import os
    import time

    import sdnet.data as data
    cache = tmp_path / "cache"
    first, second = (make_image_folder(tmp_path / name / "cifar10-jpg", n_train=1, n_test=n)
                     for name, n in (("a", 1), ("b", 2)))
    archive = _archive(first, tmp_path / "data" / "cifar.tar.gz")
    twin = tmp_path / "twin" / "cifar.tar.gz"  # the same bytes at another path
    twin.parent.mkdir()
    twin.write_bytes(archive.read_bytes())
    legacy = cache / "decoded" / "cifar10-jpg-test-0123456789abcdef.npz"
    legacy.parent.mkdir(parents=True)
    legacy.write_bytes(b"from before")
    scratch_old, scratch_new = cache / "decoded" / "x.npz.tmp1", cache / "decoded" / "y.npz.tmp2"
    named_tmp = cache / "decoded" / "my.tmp-test-0123456789abcdef.npz"  # a copy of a folder named my.tmp: not scratch
    for f in (scratch_old, scratch_new, named_tmp):
        f.write_bytes(b"half")
    day_ago = time.time() - 2 * data._STALE_SCRATCH_SECONDS
    for f in (scratch_old, named_tmp):
        os.utime(f, (day_ago, day_ago))
    for split in ("train", "test"):
        load_split(archive, split)
        load_split(twin, split)
    unpacked = list((cache / "unpacked").iterdir())
    assert len(unpacked) == 1 and sorted(data._sources(unpacked[0])) == sorted(
        str(p.resolve()) for p in (archive, twin))
    decoded = sorted(f.name for f in (cache / "decoded").glob("*.npz"))
    assert len(decoded) == 4 and {legacy.name, named_tmp.name} <= set(decoded)  # train, test, two from before
    assert not scratch_old.exists() and scratch_new.exists() and named_tmp.exists()

    _archive(second, archive)  # new bytes at the first path: the old copy still serves the twin
    new_test = load_split(archive, "test")
    assert len(list((cache / "unpacked").iterdir())) == 2
    twin.write_bytes(archive.read_bytes())  # and at the twin's: the first copy serves nobody now, and goes
    assert torch.equal(load_split(twin, "test").images, new_test.images)
    assert not unpacked[0].exists() and len(list((cache / "unpacked").iterdir())) == 1
    load_split(twin, "train")  # a decoded copy written: those of the first copy's splits go with it
    assert len(list((cache / "decoded").glob("*.npz"))) == 4  # the new train and test, two from before

    # images edited in a folder: the split's older decoded copy goes, the other split's stays
    load_split(second, "test"), load_split(second, "train")
    before = set((cache / "decoded").glob("*.npz"))
    edited = sorted((second / "test").rglob("*.png"))[0]
    os.utime(edited, ns=(edited.stat().st_mtime_ns + 10**9,) * 2)
    load_split(second, "test")
    after = set((cache / "decoded").glob("*.npz"))
    assert len(after) == len(before) and len(after - before) == 1

    # a copy from before copies named their sources is named when its source uses it
    named = [*(cache / "unpacked").iterdir(), *(after - before)]
    for copy in named:
        data._sources_file(copy).unlink()
    load_split(twin, "test"), load_split(second, "test")
    assert [data._sources(copy) for copy in named] == [[str(twin.resolve())], [str((second / "test").resolve())]]


def test_the_cache_prunes_no_copy_in_use(tmp_path, monkeypatch):
    """What a review found the pruning removed wrongly: the copy of one folder spelt two ways (relative and absolute
    paths had keys of their own and one source, so each load decoded again and removed the other's copy); the copy
    of a folder that is only out of sight for a while (an unmounted drive); a path with a line break in it."""
    import sdnet.data as data
    decoded = []
    real = data._decode_all
    monkeypatch.setattr(data, "_decode_all", lambda files: decoded.append(len(files)) or real(files))
    root = make_image_folder(tmp_path / "data" / "tree", n_train=1, n_test=1)
    monkeypatch.chdir(tmp_path)
    for spelling in ("data/tree", root, "data/../data/tree"):
        load_split(spelling, "test")
    assert decoded == [3]
    away = tmp_path / "away"
    root.rename(away)  # unmounted: another folder's copy is made meanwhile
    load_split(make_image_folder(tmp_path / "other", n_train=1, n_test=1), "test")
    away.rename(root)
    load_split(root, "test")
    assert decoded == [3, 3]
    odd = make_image_folder(tmp_path / "line\nbreak", n_train=1, n_test=1)
    load_split(odd, "test"), load_split(root, "train")
    load_split(odd, "test")
    assert decoded == [3, 3, 3, 3]


def test_a_cache_that_cannot_be_tidied_still_serves(tmp_path, monkeypatch, capsys):
    import sdnet.data as data
    root = make_image_folder(tmp_path / "tree", n_train=1, n_test=1)

    def refuse(*args):
        raise PermissionError("read-only file system")
    monkeypatch.setattr(data, "_name_sources", refuse)
    assert len(load_split(root, "test")) == 3 and len(load_split(root, "test")) == 3
    assert "note: could not tidy the cache folder" in capsys.readouterr().err


def test_download_fetches_only_where_there_is_no_data(tmp_path, monkeypatch):
    """--download with a tree or an archive fetched CIFAR into it (or, offline, died in a urllib traceback) instead
    of loading the data given; offline, a new folder gets a one-line error and is not left behind empty."""
    import urllib.error

    from torchvision import datasets

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")
    monkeypatch.setattr(datasets, "CIFAR10", offline)
    root = make_image_folder(tmp_path / "tree" / "cifar10-jpg", n_train=1, n_test=1)
    archive = _archive(root, tmp_path / "data" / "cifar.tar.gz")
    for given in (root, archive):
        assert load_split(given, "test", download=True).classes == CLASSES[:3]
    fresh = tmp_path / "new" / "cifar"
    with pytest.raises(DatasetError, match="could not download cifar10 into .*Name or service not known; without a "
                                           "network, pass --data"):
        load_split(fresh, "train", download=True)
    assert not fresh.exists() and not fresh.parent.exists()  # nor the parent it made for it
    # a torchvision folder that cannot be read is not a network problem
    monkeypatch.setattr(datasets, "CIFAR10", lambda *a, **k: (_ for _ in ()).throw(PermissionError(13, "denied")))
    (tmp_path / "tv" / "cifar-10-batches-py").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"^torchvision cifar10 at .*denied$"):
        load_split(tmp_path / "tv", "test")
    # torchvision's own hint is an argument of its API (evaluate has no --download): said as a command here
    monkeypatch.undo()
    monkeypatch.setenv("SDNET_CACHE", str(tmp_path / "cache"))
    with pytest.raises(DatasetError, match=r"^torchvision cifar10 at .*: Dataset not found or corrupted\. \(python -m "
                                           r"sdnet.train --download fetches it, with a network\)$"):
        load_split(tmp_path / "tv", "test")


def test_tarball_with_path_traversal_is_refused(tmp_path):
    evil = tmp_path / "evil.tar.gz"
    payload = tmp_path / "payload.txt"
    payload.write_text("x")
    with tarfile.open(evil, "w:gz") as tar:
        tar.add(payload, arcname="../../escaped.txt")
    with pytest.raises(DatasetError, match="cannot unpack"):
        load_split(evil, "train")
    assert not (tmp_path / "escaped.txt").exists()
    assert not list((tmp_path / "cache" / "unpacked").iterdir())  # no half-unpacked scratch folder left


def test_an_image_replaced_by_one_of_the_same_size_is_decoded_afresh(tmp_path):
    """The decode cache is keyed by each file's size and modification time, not its size alone."""
    import os
    from PIL import Image
    root = make_image_folder(tmp_path / "tree", n_train=1, n_test=1, suffix=".bmp")  # BMP: size fixed by the pixels
    first = load_split(root, "test")
    target = sorted((root / "test").rglob("*.bmp"))[0]
    size, mtime = target.stat().st_size, target.stat().st_mtime_ns
    Image.new("RGB", (32, 32), (255, 255, 255)).save(target)
    os.utime(target, ns=(mtime + 10**9, mtime + 10**9))
    assert target.stat().st_size == size
    again = load_split(root, "test")
    assert again.images[0].min() == 255 and not torch.equal(again.images, first.images)


def test_an_unreadable_image_in_a_dataset_is_named_in_one_line(tmp_path):
    root = make_image_folder(tmp_path / "tree", n_train=2, n_test=1)
    broken = root / "train" / CLASSES[0] / "0001.png"
    broken.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n")  # not a decoder it may reach
    with pytest.raises(DatasetError, match="0001.png is not a readable image"):
        load_split(root, "train")


def test_missing_and_malformed_datasets_say_what_was_expected(tmp_path):
    with pytest.raises(DatasetError, match="--data PATH"):
        resolve_data_path(None)
    with pytest.raises(DatasetError, match="not found at .*train/<class>"):
        load_split(tmp_path / "nowhere", "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no 'train' folder"):
        load_split(tmp_path / "empty", "train")
    (tmp_path / "noimg" / "train" / "cat").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no images under"):
        load_split(tmp_path / "noimg", "train")
    bad = tmp_path / "notes.txt"
    bad.write_text("hello")
    with pytest.raises(DatasetError, match="not a .tar.gz"):
        load_split(bad, "train")
    with pytest.raises(ValueError, match="split"):
        load_split(tmp_path, "val")
    # one folder holding the tree is looked into; two are ambiguous, and neither is picked
    make_image_folder(tmp_path / "two" / "a", n_train=1, n_test=1)
    assert len(load_split(tmp_path / "two", "train")) == 3
    make_image_folder(tmp_path / "two" / "b", n_train=1, n_test=1)
    with pytest.raises(DatasetError, match="no 'train' folder in .*two"):
        load_split(tmp_path / "two", "train")


def test_subset_is_fixed_and_sized(tmp_path):
    train = load_split(make_image_folder(tmp_path / "t", n_train=5), "train")
    a, b = train.subset(7, seed=1), train.subset(7, seed=1)
    assert len(a) == 7 and torch.equal(a.labels, b.labels) and train.subset(None) is train


def test_augment_is_a_padded_crop_or_flip_of_the_image():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 3, 8, 8)
    y = augment(x, g, padding=2)
    assert y.shape == x.shape
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(64):
        found = any(torch.equal(y[i], cand)
                    for dy in range(5) for dx in range(5)
                    for cand in (padded[i, :, dy:dy + 8, dx:dx + 8], padded[i, :, dy:dy + 8, dx:dx + 8].flip(-1)))
        assert found, f"image {i} is not a crop of its padded original"
    flips = sum(not torch.equal(y[i], x[i]) for i in range(64))
    assert flips > 32  # most images moved or flipped
    # every offset of the padding occurs (0..2p, not 0..2p-1), and about half the images are flipped
    g = torch.Generator().manual_seed(1)
    x = torch.rand(256, 1, 5, 5)
    y = augment(x, g, padding=2)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    seen = {(dy, dx) for i in range(256) for dy in range(5) for dx in range(5)
            if torch.equal(y[i], padded[i, :, dy:dy + 5, dx:dx + 5])
            or torch.equal(y[i], padded[i, :, dy:dy + 5, dx:dx + 5].flip(-1))}
    assert {dy for dy, _ in seen} == set(range(5)) and {dx for _, dx in seen} == set(range(5))
    unpadded = augment(x[:64], torch.Generator().manual_seed(2), padding=0)
    flipped = sum(torch.equal(unpadded[i], x[i].flip(-1)) for i in range(64))
    assert 20 < flipped < 44
    # seeded: the same generator seed gives the same batch
    assert torch.equal(augment(x, torch.Generator().manual_seed(5)), augment(x, torch.Generator().manual_seed(5)))


@pytest.mark.skipif(__import__("helpers").shared_data() is None, reason="the shared CIFAR-10 JPEG tarball is absent")
def test_shared_cifar10_split_loads(monkeypatch):
    from helpers import shared_data
    monkeypatch.delenv("SDNET_CACHE")  # the user's cache: shared with the other tests of real data
    test = load_split(shared_data(), "test")
    assert test.images.shape == (9000, 3, 32, 32) and test.classes == CLASSES
    assert torch.bincount(test.labels).tolist() == [900] * 10


def test_hidden_names_are_left_out_and_an_empty_class_folder_is_refused(tmp_path):
    """A Jupyter .ipynb_checkpoints folder was a class (a 3-class tree trained a 4-output model), and a Mac's
    ._0001.png an image it could not read."""
    root = make_image_folder(tmp_path / "tree", n_train=2, n_test=1)
    (root / "train" / ".ipynb_checkpoints").mkdir()
    (root / "train" / CLASSES[0] / "._0000.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    assert load_split(root, "train").classes == CLASSES[:3] and len(load_split(root, "train")) == 6
    (root / "train" / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"has class folder\(s\) with no images: empty; remove them"):
        load_split(root, "train")


def test_a_damaged_decoded_copy_is_decoded_again(tmp_path, capsys):
    """A damaged .npz in the cache ended every later run in a traceback (BadZipFile, or IndexError for one of
    another length) until the cache was deleted by hand."""
    import numpy as np
    root = make_image_folder(tmp_path / "tree", n_train=2, n_test=1)
    first = load_split(root, "train")
    (cached,) = (tmp_path / "cache" / "decoded").glob("*.npz")
    for damage in (lambda: cached.write_bytes(cached.read_bytes()[:100]),
                   lambda: np.savez(cached, images=np.zeros((2, 3, 32, 32), np.uint8))):
        damage()
        again = load_split(root, "train")
        assert torch.equal(again.images, first.images) and "is damaged" in capsys.readouterr().err
        assert torch.equal(load_split(root, "train").images, first.images)  # and the copy is sound again


def test_a_cache_folder_that_cannot_be_written(tmp_path, monkeypatch, capsys):
    """A folder's images are used from memory, said (a cache it cannot write is not an error); an archive, which
    must be unpacked somewhere, is refused in a line naming the cache. Both were tracebacks."""
    root = make_image_folder(tmp_path / "tree" / "cifar10-jpg", n_train=2, n_test=1)
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("SDNET_CACHE", str(tmp_path / "file" / "cache"))
    assert len(load_split(root, "train")) == 6
    assert "could not keep the decoded images in" in capsys.readouterr().err
    archive = _archive(root, tmp_path / "cifar.tar.gz")
    with pytest.raises(DatasetError, match=r"cannot unpack .*cifar.tar.gz: the cache folder .*file/cache/unpacked "
                                           r"cannot be written \(.*\); SDNET_CACHE names another"):
        load_split(archive, "train")


def test_an_odd_image_in_the_tree_is_named(tmp_path):
    """One image of another size among 50,000 was to be hunted for; a decompression bomb was a traceback."""
    from PIL import Image
    root = make_image_folder(tmp_path / "tree", n_train=3, n_test=1)
    odd = root / "train" / CLASSES[1] / "0001.png"
    Image.new("RGB", (64, 48)).save(odd)
    with pytest.raises(DatasetError, match=rf"1 of 9 are not 32x32 like the rest, e.g. {re.escape(str(odd))} \(64x48\)"):
        load_split(root, "train")
    Image.new("1", (20000, 10000)).save(odd)  # 200 megapixels in a few kB
    with pytest.raises(DatasetError, match=rf"{re.escape(str(odd))} is not a readable image \(DecompressionBombError"):
        load_split(root, "train")
