"""Where does a CUDA AOTInductor package of ours crash? (diagnosis for issue 3; run on the GPU machine)

    python scripts/aoti_probe.py OUT_DIR [--device cuda]

Builds, each in a fresh process that only loads and runs it (as a deployment would): (1) a plain nn.Linear package,
(2) the tiny Llama's exported decode program, (3) its prefill program. Prints each step's exit status and the
child's last stderr lines (faulthandler's Python stack on a crash), and lists tensors of the programs that are
not on the target device (a host constant in a CUDA package is one known cause of load-time crashes).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path[0] = str(Path(__file__).resolve().parents[1])
import entropykv_fx  # noqa: E402
from entropykv_fx.aot import build_programs  # noqa: E402
from entropykv_fx.passes.backend import INDUCTOR_CONFIGS  # noqa: E402
from entropykv_fx.passes.decompose import decompositions  # noqa: E402


def load_and_run(package: Path, inputs: Path) -> dict:
    code = ("import faulthandler, torch; faulthandler.enable()\n"
            "import entropykv_fx\n"
            f"runner = torch._inductor.aoti_load_package({str(package)!r})\nprint('loaded', flush=True)\n"
            f"args = torch.load({str(inputs)!r}, weights_only=True)\n"
            "out = runner(*args)\ntorch.cuda.synchronize() if torch.cuda.is_available() else None\n"
            "print('ran', [tuple(t.shape) for t in (out if isinstance(out, (list, tuple)) else [out])], flush=True)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    return {"rc": run.returncode, "stdout": run.stdout.strip()[-300:], "stderr_tail": run.stderr.strip().splitlines()[-25:]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(args.device)
    tmp = Path(tempfile.mkdtemp())
    report = {}

    linear = torch.nn.Linear(8, 8).to(dev)
    x = (torch.randn(2, 8, device=dev),)
    ep = torch.export.export(linear, x)
    torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp / "linear.pt2"))
    torch.save(x, tmp / "linear_in.pt")
    report["linear"] = load_and_run(tmp / "linear.pt2", tmp / "linear_in.pt")
    print(json.dumps({"linear": report["linear"]}), flush=True)

    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(cfg).eval().to(dev)
    cal = tmp / "cal.json"
    cal.write_text(json.dumps({"layer_fractions": [1.0, 1.0]}))
    entropykv_fx.optimize(model, budget_source="calibrated", calibration_file=str(cal))
    programs = dict(zip(("prefill", "decode"), build_programs(model, prompt_length=16, max_new_tokens=4)[:2]))
    for name in ("decode", "prefill"):
        ep = programs[name]
        off = {k: str(v.device) for k, v in {**ep.constants, **ep.state_dict}.items() if v.device.type != dev.type}
        example = tuple(a for a in ep.example_inputs[0]) if ep.example_inputs else None
        off_inputs = [str(a.device) for a in example or () if isinstance(a, torch.Tensor) and a.device.type != dev.type]
        package = tmp / f"{name}.pt2"
        torch._inductor.aoti_compile_and_package(ep.run_decompositions(decompositions()), package_path=str(package),
                                                 inductor_configs=INDUCTOR_CONFIGS)
        torch.save(example, tmp / f"{name}_in.pt")
        report[name] = {"off_device_tensors": off, "off_device_inputs": off_inputs,
                        **load_and_run(package, tmp / f"{name}_in.pt")}
        print(json.dumps({name: report[name]}), flush=True)
    (args.out / "aoti_probe.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
