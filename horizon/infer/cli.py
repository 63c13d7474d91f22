"""`horizon generate RUN_DIR --prompt "..." [--cache streaming --cache-size 256] [--max-new-tokens N]`:
sample from a saved run with a KV cache, printing tokens as they come (the jitted decode loop runs
in chunks of --chunk tokens; each chunk is printed when it returns). `--speculative mtp` drafts with
the model's parallel MTP heads (horizon.infer.mtp_draft) and prints the text once, with the
acceptance on stderr."""

from __future__ import annotations

import argparse
import codecs
import sys

from horizon.errors import ConfigError


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, through the CLI's user-error path
        raise ConfigError(f"horizon generate: {message}")


def parser() -> argparse.ArgumentParser:
    from horizon.config import DECODE_CACHES

    p = _Parser(prog="horizon generate", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="a run directory written by horizon (config.json + checkpoints/)")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--cache", default="full", choices=DECODE_CACHES, help="KV cache of every attention layer")
    p.add_argument("--cache-size", type=int, default=None,
                   help="slots per layer (streaming caches: n_sinks + window; default for full: prompt + new)")
    p.add_argument("--n-sinks", type=int, default=4, help="sink slots of the streaming / ema_sink caches")
    p.add_argument("--page-size", type=int, default=16, help="slots per page of the paged cache")
    p.add_argument("--ema", type=float, default=0.9, help="ema_sink: S <- ema * S + (1 - ema) * evicted")
    p.add_argument("--policy", default="full", help="decode-time selector for full / paged caches")
    p.add_argument("--options", default="", help="selector arguments, 'k=64,threshold=0.9'")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1]")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--stop", default=None, help="stop after this text's first token (e.g. a newline: $'\\n')")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chunk", type=int, default=8, help="tokens per decode-loop call between prints")
    p.add_argument("--speculative", default="none", choices=("none", "mtp"),
                   help="mtp: self-speculative decoding, the model's MTP heads draft (needs --cache full --policy full)")
    return p


def main(argv: list[str], out=None) -> str:
    """Runs the command; returns the generated text (also written to `out`, default stdout)."""
    from horizon.config import Decode
    from horizon.data.tokenizer import get_tokenizer
    from horizon.infer.generate import Decoder
    from horizon.models import load

    a = parser().parse_args(argv)
    out = out or sys.stdout
    tok = get_tokenizer()
    prompt = tok.encode(a.prompt).astype("int32")
    if len(prompt) == 0:
        raise ConfigError("--prompt: empty; give at least one character")
    if a.chunk < 1:
        raise ConfigError(f"--chunk: {a.chunk} must be >= 1")
    stops = () if a.stop is None else (int(tok.encode(a.stop)[0]),)
    decode = Decode(cache=a.cache, cache_size=a.cache_size, n_sinks=a.n_sinks, page_size=a.page_size, ema=a.ema,
                    policy=a.policy, options=a.options, temperature=a.temperature, top_p=a.top_p,
                    max_new_tokens=a.max_new_tokens, stop_tokens=stops, seed=a.seed)
    model, _ = load(a.run_dir)
    text = []
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a character may span chunks

    def show(new_BN):
        piece = utf8.decode(bytes(int(t) & 0xFF for t in new_BN[0] if t >= 0))
        text.append(piece)
        out.write(piece)
        out.flush()

    if a.speculative == "mtp":
        from horizon.infer.mtp_draft import mtp_speculative_generate

        res = mtp_speculative_generate(model, prompt[None], decode=decode)
        show(res.tokens[0][None])
        print(f"mtp draft: {res.mean_accepted:.2f} of {res.k} draft tokens accepted per round, "
              f"{res.tokens_per_forward():.2f} tokens per target forward", file=sys.stderr)
    else:
        Decoder(model, decode)(prompt[None], on_tokens=show, chunk=a.chunk)
    text.append(utf8.decode(b"", final=True))
    out.write(text[-1] + "\n")
    return "".join(text)
