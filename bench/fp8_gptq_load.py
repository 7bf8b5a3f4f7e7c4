"""What GPTQ-rounded FP8 weights (EngineConfig.fp8_weight_calibration="gptq") cost at load on one
GPU: an FP8 engine of a named shape (dummy weights) built with round-to-nearest, then with GPTQ,
in one process; the build time, GPTQ's own log line (passes and rounding) and peak GPU memory.
(What GPTQ buys in fidelity: bench.fp8_fidelity, on the real default model on CPU.)

    python -m bench.fp8_gptq_load [--shape llama-3-8b]
"""

from __future__ import annotations

import argparse
import gc
import logging
import time

import torch

from engine.config import EngineConfig
from engine.engine import Engine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="llama-3-8b")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    print(torch.cuda.get_device_name())
    for calibration in (None, "gptq"):
        torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        engine = Engine(
            EngineConfig(
                model=f"dummy:{args.shape}", device="cuda", dtype="bfloat16",
                quantization="fp8", fp8_weight_calibration=calibration,
                kv_cache_bytes=2 << 30, cuda_graphs=False,
            )
        )  # fmt: skip
        seconds = time.perf_counter() - started
        peak = torch.cuda.max_memory_allocated() / 2**30
        print(f"fp8 weights, {calibration or 'round to nearest'}: built in {seconds:.1f} s, "
              f"peak GPU memory {peak:.1f} GiB", flush=True)  # fmt: skip
        del engine
        gc.collect()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
