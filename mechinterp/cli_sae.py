"""The ``mechinterp sae`` command: ``encode``, ``top-features`` and ``steer``.

- ``encode`` streams the SAE features of a set of prompts to a folder (resumable), see
  :func:`mechinterp.sae.stream_features`, and prints the store's L0 and dead latents.
- ``top-features`` prints the strongest latents at each position of a prompt (or of a prompt
  in a store), or the contexts where one latent fires most strongly in a store.
- ``steer`` clamps or steers one latent at every position with :class:`mechinterp.sae.SAEEdit`
  and prints the next-token distribution (and a greedy continuation) with and without the edit.

Every subcommand works offline on the shipped model and SAE by default
(``--model induction-2l --sae induction-2l-sae``); ``--model`` also takes a local model
directory and ``--sae`` a local SAE folder or file (any format :func:`~mechinterp.sae.load_sae`
reads). ``--dtype`` casts the SAE (the model keeps its own; its activations are cast to the
SAE's dtype): on a Hopper GPU, bfloat16 and float16 SAEs encode through the fused GEMM
wherever it applies (:func:`mechinterp.sae.fused.default_reason`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

_DEFAULT_MODEL = "induction-2l"
_DTYPES = ("float32", "bfloat16", "float16")
_DEFAULT_SAE = "induction-2l-sae"
# An induction prompt for the shipped model: the next token should be "fafi".
_DEMO_PROMPT = "fuba bu mabi fafi vetu fuba bu mabi"
# The default prompts of `encode` are the clean prompts `mechinterp patch` builds.
_INDUCTION_SPAN, _INDUCTION_K = 12, 6


def sae_parser(parser: argparse.ArgumentParser) -> None:
    subparsers = parser.add_subparsers(dest="sae_command", metavar="SUBCOMMAND")
    for name, (help_text, configure, _) in SUBCOMMANDS.items():
        configure(subparsers.add_parser(name, help=help_text, description=help_text))


def sae(args: argparse.Namespace) -> int:
    from mechinterp.errors import InputError

    if args.sae_command is None:
        msg = f"a subcommand is required: {', '.join(SUBCOMMANDS)}; got none"
        raise InputError(msg)
    return SUBCOMMANDS[args.sae_command][2](args)


# ---- shared ----


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=_DEFAULT_MODEL,
                        help=f"shipped model name or a local model directory (default: "
                             f"{_DEFAULT_MODEL})")
    parser.add_argument("--sae", default=_DEFAULT_SAE,
                        help=f"shipped SAE name or a local SAE folder/file (default: "
                             f"{_DEFAULT_SAE})")
    parser.add_argument("--site", default=None,
                        help="site to read, e.g. resid_post.0 (default: the SAE's hook_name)")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--dtype", choices=_DTYPES, default=None,
                        help="cast the SAE to this dtype; the model's activations follow it "
                             "(default: as stored)")


def _load_model(args: argparse.Namespace):
    from mechinterp.loading import load

    return load(args.model, device=args.device)


def _load_sae(args: argparse.Namespace):
    from mechinterp.errors import InputError
    from mechinterp.sae import load_sae
    from mechinterp.sae.stream import resolve_site
    from mechinterp.zoo import ZOO_SAES, zoo_sae

    if args.sae in ZOO_SAES:
        sae = zoo_sae(args.sae, device=args.device)
    elif Path(args.sae).expanduser().exists():
        sae = load_sae(args.sae, device=args.device)
    else:
        msg = (f"--sae must be a shipped SAE ({', '.join(sorted(ZOO_SAES))}) or an existing SAE "
               f"folder or file; got {args.sae!r}")
        raise InputError(msg)
    if args.dtype is not None:
        import torch

        sae = sae.to(dtype=getattr(torch, args.dtype))
    return sae, resolve_site(sae, args.site)


def _token_text(tokenizer, token_id: int) -> str:
    if tokenizer is None:
        return str(token_id)
    return str(tokenizer.convert_ids_to_tokens(int(token_id)))


def _table(header: list[str], rows: list[list[str]], *, right: set[int] = frozenset()) -> None:
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows)]
    for row in [header, *rows]:
        cells = [f"{cell:>{w}}" if i in right else f"{cell:<{w}}"
                 for i, (cell, w) in enumerate(zip(row, widths))]
        print("  ".join(cells).rstrip())


# ---- encode ----


def encode_parser(parser: argparse.ArgumentParser) -> None:
    _model_arguments(parser)
    parser.add_argument("--prompt", action="append",
                        help="a prompt (repeat for several); default: induction prompts built for "
                             "the shipped induction model")
    parser.add_argument("--prompts-file", default=None, help="a text file with one prompt a line")
    parser.add_argument("--pairs", type=int, default=64,
                        help="default induction prompts to encode when none are given (default: 64)")
    parser.add_argument("--batch-size", type=int, default=32,
                        help="prompts per forward and per shard (default: 32)")
    parser.add_argument("--out", default="features",
                        help="folder for the shards and manifest.json; an interrupted run with the "
                             "same arguments resumes from it (default: ./features)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a store of other arguments in --out instead of refusing")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _prompts(args: argparse.Namespace, model):
    from mechinterp.errors import InputError
    from mechinterp.heads import induction_pairs

    if args.prompt and args.prompts_file:
        msg = "give prompts with --prompt or --prompts-file, not both"
        raise InputError(msg)
    if args.prompts_file:
        path = Path(args.prompts_file).expanduser()
        if not path.is_file():
            msg = f"--prompts-file must be an existing text file; got {args.prompts_file!r}"
            raise InputError(msg)
        prompts = [line for line in path.read_text().splitlines() if line.strip()]
        if not prompts:
            msg = f"--prompts-file must hold at least one non-empty line; {str(path)!r} has none"
            raise InputError(msg)
        return prompts
    if args.prompt:
        return list(args.prompt)
    if args.pairs < 1:
        msg = f"--pairs must be a positive int; got {args.pairs}"
        raise InputError(msg)
    return induction_pairs(model, pairs=args.pairs, span=_INDUCTION_SPAN, k=_INDUCTION_K,
                           seed=0).clean


def encode(args: argparse.Namespace) -> int:
    from mechinterp.sae import stream_features

    sae, site = _load_sae(args)
    model = _load_model(args)
    prompts = _prompts(args, model)
    store = stream_features(model, sae, prompts, out=args.out, site=site,
                            batch_size=args.batch_size, device=args.device,
                            resume=not args.overwrite, progress=not args.no_progress)
    n_prompts = store.manifest["identity"]["dataset"]["prompts"]
    dead = int((store.frequency() == 0).sum())
    print(f"encoded {store.rows} tokens of {n_prompts} prompts at {site} with {args.sae} "
          f"({sae.architecture}, {sae.d_sae} latents)")
    print(f"mean L0 {store.mean_l0():.2f}; dead latents {dead} of {sae.d_sae} "
          f"({dead / sae.d_sae:.1%})")
    shards = len(store.manifest["shards"])
    print(f"written to {store.path}/ (manifest.json, {shards} shard{'s' if shards != 1 else ''})")
    return 0


# ---- top-features ----


def top_features_parser(parser: argparse.ArgumentParser) -> None:
    _model_arguments(parser)
    parser.add_argument("--prompt", default=None,
                        help=f"the prompt to encode (default: {_DEMO_PROMPT!r} unless --store)")
    parser.add_argument("--store", default=None, help="a folder written by `mechinterp sae encode`")
    parser.add_argument("--latent", type=int, default=None,
                        help="with --store: print the contexts where this latent is strongest")
    parser.add_argument("--prompt-index", type=int, default=0,
                        help="with --store and no --latent: the stored prompt to show (default: 0)")
    parser.add_argument("--top", type=int, default=5,
                        help="latents per position, or contexts per latent (default: 5)")
    parser.add_argument("--context", type=int, default=5,
                        help="tokens shown on each side of a context (default: 5)")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")


def top_features(args: argparse.Namespace) -> int:
    from mechinterp.errors import InputError

    if args.top < 1:
        msg = f"--top must be a positive int; got {args.top}"
        raise InputError(msg)
    if args.store is not None and args.prompt is not None:
        msg = "give --prompt or --store, not both"
        raise InputError(msg)
    if args.latent is not None and args.store is None:
        msg = "--latent needs --store (a folder written by `mechinterp sae encode`)"
        raise InputError(msg)
    if args.store is not None:
        from mechinterp.sae import FeatureStore

        store = FeatureStore(args.store)
        tokenizer = _load_model(args).tokenizer
        if args.latent is not None:
            report = _contexts(store, tokenizer, args.latent, args.top, args.context)
        else:
            rows = store.prompt_rows(args.prompt_index)
            where = store.locate(rows)
            report = _per_position(store.features(rows), where.token_ids, tokenizer, args.top)
            report |= {"source": str(store.path), "prompt_index": args.prompt_index,
                       "site": str(store.site)}
    else:
        from mechinterp.sae import encode_sparse

        sae, site = _load_sae(args)
        model = _load_model(args)
        prompt = args.prompt if args.prompt is not None else _DEMO_PROMPT
        result = model.run(prompt, cache=[site])
        x = result.cache[site][0].to(device=sae.device, dtype=sae.dtype)
        _check_width(site, x, sae)
        report = _per_position(encode_sparse(sae, x), result.tokens.input_ids[0],
                               model.tokenizer, args.top)
        report |= {"source": prompt, "site": str(site)}
    if args.json:
        print(json.dumps(report, indent=1))
    elif "activations" in report:
        _print_contexts(report)
    else:
        _print_positions(report)
    return 0


def _check_width(site, x, sae) -> None:
    from mechinterp.errors import ShapeError

    if x.ndim != 2 or x.shape[-1] != sae.d_in:
        msg = (f"the SAE reads d_in={sae.d_in} features, but the activation at {site} has shape "
               f"{tuple(x.shape)}; pick a --site with one {sae.d_in}-wide vector per token")
        raise ShapeError(msg)


def _per_position(features, token_ids, tokenizer, top: int) -> dict:
    positions = []
    for pos in range(features.rows):
        start, stop = int(features.row_ptr[pos]), int(features.row_ptr[pos + 1])
        values, latents = features.values[start:stop], features.indices[start:stop]
        order = values.argsort(descending=True, stable=True)[:top]
        chosen = [{"latent": int(latents[i]), "value": float(values[i])}
                  for i in order.tolist() if values[i] > 0]
        token_id = int(token_ids[pos])
        positions.append({"pos": pos, "token": _token_text(tokenizer, token_id),
                          "token_id": token_id, "latents": chosen})
    return {"positions": positions}


def _print_positions(report: dict) -> None:
    if "prompt_index" in report:
        source = f"prompt {report['prompt_index']} of {report['source']}"
    else:
        source = repr(report["source"])
    print(f"top latents per position at {report['site']} of {source}")
    rows = [[str(p["pos"]), p["token"],
             "  ".join(f"{item['latent']} ({item['value']:.3f})" for item in p["latents"])]
            for p in report["positions"]]
    _table(["pos", "token", "latent (activation)"], rows, right={0})


def _contexts(store, tokenizer, latent: int, top: int, width: int) -> dict:
    from mechinterp.errors import InputError

    if width < 0:
        msg = f"--context must be a non-negative int; got {width}"
        raise InputError(msg)
    best = store.top_activations(latent, top)
    records = []
    for rank, item in enumerate(best.to_records(), start=1):
        row = item["row"]
        window = list(range(max(0, row - width), min(store.rows, row + width + 1)))
        where = store.locate(window)
        words = [
            f"[[{_token_text(tokenizer, t)}]]" if r == row else _token_text(tokenizer, t)
            for r, p, t in zip(window, where.prompts.tolist(), where.token_ids.tolist())
            if p == item["prompt"]
        ]
        records.append({"rank": rank, **item, "token": _token_text(tokenizer, item["token_id"]),
                        "context": " ".join(words)})
    frequency = float(store.frequency()[latent])
    mean = float(store.mean_activation()[latent])
    return {"source": str(store.path), "site": str(store.site), "latent": latent,
            "rows": store.rows, "frequency": frequency,
            "mean_when_firing": mean / frequency if frequency else 0.0, "activations": records}


def _print_contexts(report: dict) -> None:
    print(f"latent {report['latent']} at {report['site']} in {report['source']} "
          f"({report['rows']} tokens): fires on {report['frequency']:.2%} of tokens, mean "
          f"{report['mean_when_firing']:.3f} when it fires")
    if not report["activations"]:
        print("  it never fires in this store")
        return
    rows = [[str(r["rank"]), f"{r['value']:.4f}", str(r["prompt"]), str(r["pos"]), r["context"]]
            for r in report["activations"]]
    _table(["rank", "activation", "prompt", "pos", "context"], rows, right={0, 1, 2, 3})


# ---- steer ----


def steer_parser(parser: argparse.ArgumentParser) -> None:
    _model_arguments(parser)
    parser.add_argument("--prompt", default=_DEMO_PROMPT,
                        help=f"the prompt (default: {_DEMO_PROMPT!r})")
    parser.add_argument("--latent", type=int, required=True, help="the latent to edit")
    edit = parser.add_mutually_exclusive_group(required=True)
    edit.add_argument("--value", type=float,
                      help="clamp the latent to this activation at every position")
    edit.add_argument("--scale", type=float,
                      help="steer: add this multiple of the latent's decoder direction at every "
                           "position (its activation grows by SCALE)")
    parser.add_argument("--top", type=int, default=5, help="next tokens shown (default: 5)")
    parser.add_argument("--generate", type=int, default=5,
                        help="greedy tokens generated with and without the edit (default: 5)")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")


def steer(args: argparse.Namespace) -> int:
    import torch

    from mechinterp.errors import InputError
    from mechinterp.sae import SAEEdit, encode_subset

    for name in ("top", "generate"):
        if getattr(args, name) < (1 if name == "top" else 0):
            msg = f"--{name} must be a {'positive' if name == 'top' else 'non-negative'} int; " \
                  f"got {getattr(args, name)}"
            raise InputError(msg)
    sae, site = _load_sae(args)
    model = _load_model(args)
    if args.value is not None:
        edit = SAEEdit(site, sae, clamp={args.latent: args.value})
        kind, amount = "clamp", args.value
    else:
        edit = SAEEdit(site, sae, steer={args.latent: args.scale})
        kind, amount = "steer", args.scale
    result = model.run(args.prompt, cache=[site])
    x = result.cache[site][0].to(device=sae.device, dtype=sae.dtype)
    _check_width(site, x, sae)
    before = float(encode_subset(sae, x[-1:], [args.latent])[0, 0])
    ids = result.tokens.input_ids
    tokenizer = model.tokenizer
    report = {"prompt": args.prompt, "site": str(site), "latent": args.latent, "edit": kind,
              "amount": amount, "activation_at_last_token": before}
    for label, edits in (("unedited", []), ("edited", [edit])):
        logits = result.logits if not edits else model.logits(ids, edits=edits)
        probs = torch.softmax(logits[0, -1].double(), dim=-1)
        values, tokens = probs.topk(min(args.top, probs.numel()))
        report[label] = [{"token": _token_text(tokenizer, t), "token_id": int(t), "prob": float(p)}
                         for p, t in zip(values.tolist(), tokens.tolist())]
        report[f"{label}_continuation"] = [_token_text(tokenizer, t)
                                           for t in _greedy(model, ids, edits, args.generate)]
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    verb = (f"clamped to {amount:g}" if kind == "clamp"
            else f"steered by {amount:+g} (x its decoder direction)")
    print(f"latent {args.latent} {verb} at every position of {site}; its activation at the last "
          f"token was {before:.4f}")
    print(f"prompt: {args.prompt!r}")
    rows = []
    for rank, (plain, edited) in enumerate(zip(report["unedited"], report["edited"]), start=1):
        rows.append([str(rank), plain["token"], f"{plain['prob']:.4f}", edited["token"],
                     f"{edited['prob']:.4f}"])
    _table(["rank", "unedited", "p", "edited", "p"], rows, right={0, 2, 4})
    if args.generate:
        print(f"greedy continuation ({args.generate} tokens):")
        print(f"  unedited: {' '.join(report['unedited_continuation'])}")
        print(f"  edited:   {' '.join(report['edited_continuation'])}")
    return 0


def _greedy(model, ids, edits, steps: int) -> list[int]:
    import torch

    out = []
    for _ in range(steps):
        logits = model.logits(ids, edits=edits)
        token = int(logits[0, -1].argmax())
        out.append(token)
        ids = torch.cat([ids, torch.tensor([[token]], device=ids.device)], dim=1)
    return out


SUBCOMMANDS = {
    "encode": ("stream a dataset's SAE features to a folder (resumable) and summarise them",
               encode_parser, encode),
    "top-features": (("the strongest latents per position of a prompt, or a latent's top "
                      "contexts in a store"), top_features_parser, top_features),
    "steer": ("next-token distribution with one latent clamped or steered, next to the unedited",
              steer_parser, steer),
}
