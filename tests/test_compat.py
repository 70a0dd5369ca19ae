import subprocess
import sys


def test_timm_imports_beside_cpu_torch():
    """Fails when the compat module stops making `import timm` work with PyPI's torchvision."""
    code = "import onnxvit._compat, timm, torchvision; print(timm.create_model('deit_tiny_patch16_224').num_classes)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "1000"
