"""`python tools/convert_hf.py SRC_DIR DST_DIR`: a local Hugging Face Llama / Mistral checkpoint
(config.json + safetensors, single or sharded) to a horizon run directory that
`horizon.models.load`, `horizon eval` and sampling read. No hub access: download first."""

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))


def main(argv: list[str] | None = None) -> None:
    from horizon.cli import _user_errors_exit
    from horizon.models.hf import convert

    p = argparse.ArgumentParser(prog="tools/convert_hf.py", description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="local Hugging Face model directory (config.json, *.safetensors)")
    p.add_argument("dst", help="new horizon run directory to write")
    p.add_argument("--compute-dtype", choices=["float32", "bfloat16"], default="float32",
                   help="model.compute_dtype of the converted model (parameters stay float32)")
    p.add_argument("--name", default="hf-import", help="experiment name recorded in config.json")
    a = p.parse_args(sys.argv[1:] if argv is None else argv)
    _user_errors_exit(lambda: convert(a.src, a.dst, compute_dtype=a.compute_dtype, name=a.name))


if __name__ == "__main__":
    main()
