"""Does AOTInductor package loading work at all on this machine? (diagnosis for issue 3, no entropykv_fx code)

    python scripts/aoti_linear_probe.py

An nn.Linear is exported, packaged with aoti_compile_and_package and loaded by a fresh process, on CPU and on CUDA,
with the default options and a few alternatives; prints each load's exit status and faulthandler's first lines.
"""

import subprocess
import sys
import tempfile
from pathlib import Path

import torch

VARIANTS = {  # name: (aoti_compile_and_package inductor_configs, aoti_load_package keyword arguments)
    "default": ({}, ""),
    "run_single_threaded": ({}, "run_single_threaded=True"),
    "embed_kernel_binary": ({"aot_inductor.embed_kernel_binary": True}, ""),
}


def main() -> None:
    tmp = Path(tempfile.mkdtemp())
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        linear = torch.nn.Linear(8, 8).to(device)
        x = (torch.randn(2, 8, device=device),)
        torch.save(x, tmp / f"in_{device}.pt")
        ep = torch.export.export(linear, x)
        for name, (configs, load_kwargs) in VARIANTS.items():
            package = tmp / f"{device}_{name}.pt2"
            torch._inductor.aoti_compile_and_package(ep, package_path=str(package), inductor_configs=configs)
            code = ("import faulthandler, torch; faulthandler.enable()\n"
                    f"run = torch._inductor.aoti_load_package({str(package)!r}, {load_kwargs})\n"
                    f"out = run(*torch.load({str(tmp / f'in_{device}.pt')!r}, weights_only=True))\n"
                    "print('ran', tuple(out.shape))")
            child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
            print(f"{device} {name}: exit {child.returncode} {child.stdout.strip()!r}",
                  child.stderr.strip().splitlines()[:5] if child.returncode else "", flush=True)


if __name__ == "__main__":
    main()
