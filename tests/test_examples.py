"""examples/train_imagefolder.py and examples/predict.py end to end on a generated ImageFolder: train prompts
+ head (random ViT-Ti backbone at 32 px: nothing can be downloaded here), evaluate every epoch, save the
prompt file, rebuild the model from it in predict.py and get the trained model's logits back."""
import json
import runpy
from pathlib import Path

import pytest
import torch
from PIL import Image

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
CLASSES = ("red", "green", "blue")
MODEL = ["--model", "vit_tiny_patch16_224", "--img-size", "32"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: these models are tiny, and on a busy 2-core machine OpenMP's second thread
    makes each step wait (this module: 120 s with two threads while other jobs ran, 25-30 s with one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _image(cls: int, i: int) -> Image.Image:
    g = torch.Generator().manual_seed(100 * cls + i)
    base = torch.zeros(3, 40, 40)
    base[cls] = 0.8  # the class is the dominant colour channel
    pixels = (base + 0.2 * torch.rand(3, 40, 40, generator=g)).clamp(0, 1)
    return Image.fromarray((pixels.permute(1, 2, 0) * 255).to(torch.uint8).numpy())


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    for split, count in (("train", 4), ("val", 2)):
        for c, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                _image(c, i + (0 if split == "train" else 50)).save(folder / f"{i}.png")
    return root


def _main(script: str):
    return runpy.run_path(str(EXAMPLES / script), run_name="vpt_fast_example")["main"]


@pytest.fixture(scope="module")
def trained(image_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "task.safetensors"
    argv = [str(image_folder), *MODEL, "--no-pretrained", "--epochs", "2", "--warmup-epochs", "1", "--batch", "4",
            "--num-prompts", "4", "--workers", "0", "--device", "cpu", "--backend", "torch", "--out", str(out)]
    return _main("train_imagefolder.py")(argv), out


def test_train_writes_prompt_file_and_sidecar(trained):
    model, out = trained
    assert out.is_file() and out.with_suffix(".json").is_file()
    info = json.loads(out.with_suffix(".json").read_text())
    assert info["classes"] == sorted(CLASSES)  # ImageFolder sorts the class folders
    assert info["model_kwargs"] == {"img_size": 32} and info["pretrained"] is False
    assert model.num_classes == len(CLASSES) and not model.training


def test_train_prints_each_epoch_shallow_bf16(image_folder, tmp_path, capsys):
    out = tmp_path / "shallow.safetensors"
    _main("train_imagefolder.py")([str(image_folder), *MODEL, "--no-pretrained", "--epochs", "2", "--batch", "6",
                                   "--shallow", "--num-prompts", "2", "--workers", "0", "--device", "cpu",
                                   "--bf16", "--out", str(out)])
    text = capsys.readouterr().out
    assert "epoch 1/2:" in text and "epoch 2/2:" in text and "val top-1" in text
    assert "SGD lr 0.0234375 (base 1 x batch 6 / 256), momentum 0.9, weight decay 0.0001" in text
    assert out.is_file()


def test_predict_rebuilds_the_trained_model(trained, image_folder, capsys):
    model, out = trained
    capsys.readouterr()
    pred = _main("predict.py")([str(out), str(image_folder / "val"), "--topk", "2", "--device", "cpu",
                                "--backend", "torch"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == len(pred.paths) == 2 * len(CLASSES)
    for line, path in zip(lines, pred.paths):
        name, top = line.split(": ")
        assert name == str(path) and len(top.split(", ")) == 2
        assert all(entry.split(" ")[0] in CLASSES for entry in top.split(", "))
        assert top.split(" ")[0] == path.parent.name  # the task is easy: class names map to the right logits
    model.eval()
    with torch.inference_mode():
        expected = model(pred.inputs)
    torch.testing.assert_close(pred.logits, expected, rtol=0, atol=0)


def test_predict_arguments_override_and_bad_input(trained, image_folder, capsys, monkeypatch):
    _, out = trained
    img = next((image_folder / "val" / "red").iterdir())
    monkeypatch.setattr("sys.argv", ["predict.py", str(out), str(img), "--topk", "1", "--classes", "a,b,c",
                                     "--device", "cpu"])
    runpy.run_path(str(EXAMPLES / "predict.py"), run_name="__main__")  # as `python examples/predict.py ...`
    assert capsys.readouterr().out.strip().split(": ")[1].split(" ")[0] in ("a", "b", "c")
    with pytest.raises(SystemExit, match="2 class names for a head of 3 classes"):
        _main("predict.py")([str(out), str(img), "--classes", "a,b", "--device", "cpu"])
    with pytest.raises(SystemExit, match="no such file or folder"):
        _main("predict.py")([str(out), str(image_folder / "missing.png"), "--device", "cpu"])
