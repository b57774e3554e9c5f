"""A blind rating of styled captions: the model's mixed with people's, judged by a reader who cannot
tell which is which (procedure: docs/blind_rating.md).

    # 1. a sheet for the reader (id, caption) and a key kept from them (id, source, style, image)
    python benchmarks/blind_rating.py make --captions humorous=H.json romantic=R.json \
        --style-file ../shared/data/flickrstyle7k/flickrstyle7k.jsonl --per-group 30 --out docs/ratings/NAME
    # two systems on the same images: --captions before:humorous=H0.json after:humorous=H1.json ...
    # 2. each reader fills NAME/sheet.csv's well_formed and witty columns (1 or 0) into
    #    NAME/ratings-1.csv (a second reader: NAME/ratings-2.csv)
    # 3. the table, the readers' agreement, and how well the fluency judge agrees with them
    python benchmarks/blind_rating.py score docs/ratings/NAME [--model DIR]

    # truth to the photo: factual captions of several systems on the same photos, for readers who see them
    python benchmarks/blind_rating.py make-truth --captions before=B.json after=A.json \
        --photos-dir ../shared/data/coco_mini --images-of docs/ratings/OLD/key.csv --out docs/ratings/NAME
    python benchmarks/blind_rating.py truth docs/ratings/NAME
    # how factual captions read: the captions of truth sheets, without the photos, scored as above
    python benchmarks/blind_rating.py make-form docs/ratings/TRUTH1 docs/ratings/TRUTH2 --out docs/ratings/NAME

H.json, R.json: `aicrl evaluate --style S --captions FILE` output ({image: caption}, FlickrStyle dev).
People's captions are drawn from the same style's dev references, one per image, of other images
than the model's sample, so that no pair gives itself away; both are written the model's way (lower
case, no punctuation).
"""
from __future__ import annotations

import argparse
import csv
import json
import random
from pathlib import Path

from aicrl.data.datasets import read_style_jsonl
from aicrl.data.vocab import tokenize


def make(args) -> None:
    rng = random.Random(args.seed)
    styled = read_style_jsonl(args.style_file, ".")
    systems: dict[str, dict[str, dict]] = {}  # style -> system -> {image: caption}
    for item in args.captions:
        name, path = item.split("=", 1)
        system, style = name.split(":", 1) if ":" in name else ("model", name)
        systems.setdefault(style, {})[system] = json.loads(Path(path).read_text())
    rows = []
    for style, by_system in systems.items():
        images = sorted(set.intersection(*(set(c) for c in by_system.values())))
        rng.shuffle(images)
        mine, others = images[: args.per_group], images[args.per_group:]
        for system, captions in by_system.items():  # every system on the same images
            rows += [{"source": system, "style": style, "image": i, "caption": captions[i]} for i in mine]
        refs = styled.references("dev", style)
        people = [i for i in others if i in refs][: args.per_group]
        rows += [{"source": "human", "style": style, "image": i, "caption": rng.choice(refs[i])} for i in people]
    rng.shuffle(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "sheet.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "style", "caption", "well_formed", "witty"])
        for n, r in enumerate(rows, 1):
            # one form for all (lower case, no punctuation): a final " ." would give people away
            w.writerow([n, r["style"], " ".join(tokenize(r["caption"])), "", ""])
    with open(out / "key.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "source", "style", "image"])
        for n, r in enumerate(rows, 1):
            w.writerow([n, r["source"], r["style"], r["image"]])
    print(f"{len(rows)} captions: give {out / 'sheet.csv'} to the reader, keep {out / 'key.csv'} from them")


def _auc(scores: list[float], labels: list[int]) -> float:
    """P(a well-formed caption scores above a broken one), ties counted half."""
    good = [s for s, y in zip(scores, labels) if y]
    bad = [s for s, y in zip(scores, labels) if not y]
    if not good or not bad:
        return float("nan")
    wins = sum((g > b) + 0.5 * (g == b) for g in good for b in bad)
    return wins / (len(good) * len(bad))


def _kappa(a: list[int], b: list[int]) -> float:
    """Cohen's kappa of two readers' 0/1 marks."""
    n = len(a)
    observed = sum(x == y for x, y in zip(a, b)) / n
    pa, pb = sum(a) / n, sum(b) / n
    expected = pa * pb + (1 - pa) * (1 - pb)
    return (observed - expected) / (1 - expected) if expected < 1 else 1.0


def score(args) -> None:
    folder = Path(args.folder)
    key = {r["id"]: r for r in csv.DictReader(open(folder / "key.csv"))}
    readers = {p.stem: {r["id"]: r for r in csv.DictReader(open(p))} for p in sorted(folder.glob("ratings*.csv"))}
    if not readers:
        raise SystemExit(f"{folder}: no ratings*.csv yet")
    ids = sorted(set.intersection(*(set(r) for r in readers.values())), key=int)
    # factual captions are rated for well-formed only: their sheets have no witty column
    marks = [w for w in ("well_formed", "witty") if all(w in rated[ids[0]] for rated in readers.values())]
    mark = {(name, i, what): int(rated[i][what]) for name, rated in readers.items() for i in ids for what in marks}
    groups: dict[tuple[str, str], list[str]] = {}
    for i in ids:
        groups.setdefault((key[i]["source"], key[i]["style"]), []).append(i)
    names = list(readers)
    per_reader = len(names) > 1
    print("| captions | n | well-formed | witty |" + ("".join(f" {n}: well-formed, witty |" for n in names)
                                                   if per_reader else ""))
    print("|---|---:|---:|---:|" + "---:|" * (len(names) if per_reader else 0))
    result: dict = {"readers": names}
    for (source, style), members in sorted(groups.items(), key=lambda kv: (kv[0][0] == "human", kv[0][1], kv[0][0])):
        mean = {what: sum(mark[(n, i, what)] for n in names for i in members) / (len(names) * len(members))
                for what in marks}
        each = {n: {what: sum(mark[(n, i, what)] for i in members) / len(members) for what in marks} for n in names}
        result[f"{source}_{style}"] = {"n": len(members), **{k: round(v, 3) for k, v in mean.items()},
                                       "by_reader": {n: {k: round(v, 3) for k, v in e.items()} for n, e in each.items()}}
        line = f"| {source}, {style} | {len(members)} | {mean['well_formed']:.0%} | {_share(mean.get('witty'))} |"
        if per_reader:
            line += "".join(f" {e['well_formed']:.0%}, {_share(e.get('witty'))} |" for e in each.values())
        print(line)
    if per_reader:
        result["kappa_well_formed"] = round(_kappa([mark[(names[0], i, "well_formed")] for i in ids],
                                                   [mark[(names[1], i, "well_formed")] for i in ids]), 3)
        print(f"agreement of the first two readers on well-formed: Cohen's kappa {result['kappa_well_formed']:.2f}")
    if args.model is not None:
        from aicrl.data.vocab import Vocabulary
        from aicrl.fluency import FluencyJudge
        from aicrl.model.captioner import default_model_dir
        from aicrl.model.folder import ModelFolder

        model = Path(args.model) if args.model else default_model_dir()
        judge, vocab = FluencyJudge.load(model), Vocabulary.load(ModelFolder(model).vocab)
        first = readers[names[0]]
        p = judge.score([first[i]["caption"] for i in ids], vocab.stoi, vocab.unk)
        # a caption counts as well-formed when most readers say so (the first reader breaks a tie)
        votes = [sum(mark[(n, i, "well_formed")] for n in names) for i in ids]
        labels = [int(v * 2 > len(names) or (v * 2 == len(names) and mark[(names[0], i, "well_formed")]))
                  for v, i in zip(votes, ids)]
        judged = {}
        for source in ("model", "human", "all"):  # "model": every system's captions
            pick = [k for k, i in enumerate(ids) if source == "all" or (source == "human") == (key[i]["source"] == "human")]
            judged[source] = {"auc": round(_auc([float(p[k]) for k in pick], [labels[k] for k in pick]), 3),
                              "judged_well_formed": round(float((p[pick] >= 0.5).mean()), 3)}
        result["fluency_judge"] = judged
        print("fluency judge against the readers' well-formed (AUC): " + ", ".join(
            f"{s} {v['auc']:.2f}" for s, v in judged.items()) + "; share it judges well-formed: " + ", ".join(
            f"{s} {v['judged_well_formed']:.0%}" for s, v in judged.items()))
    (folder / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    if args.save_to_model is not None:  # the README's table of blind ratings comes from metrics.json
        from aicrl.model.captioner import default_model_dir
        from aicrl.model.folder import ModelFolder

        model = ModelFolder(args.save_to_model or default_model_dir())
        ratings = model.read_metrics().get("blind_ratings", {})
        model.merge_metrics({"blind_ratings": ratings | {folder.name: result}})


def _share(x: float | None) -> str:
    return "-" if x is None else f"{x:.0%}"


def make_truth(args) -> None:
    """A truth sheet (id, photo, caption, verdict) of each system's captions of the same photos,
    shuffled together, and its key (id, source, image): docs/blind_rating.md, "Truth to the photo"."""
    rng = random.Random(args.seed)
    systems = {name: json.loads(Path(path).read_text()) for name, path in (c.split("=", 1) for c in args.captions)}
    images = sorted(set.intersection(*(set(c) for c in systems.values())))
    if args.changed_only:  # rate what a change changed
        images = [i for i in images if len({c[i] for c in systems.values()}) > 1]
    if args.images_of:  # the photos of an earlier sheet, so that ratings can be compared
        wanted = {r["image"] for r in csv.DictReader(open(args.images_of))}
        images = [i for i in images if i in wanted]
    else:
        rng.shuffle(images)
        images = images[: args.photos]
    rows = [(system, image, captions[image]) for system, captions in systems.items() for image in images]
    rng.shuffle(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    photos = Path(args.photos_dir)
    with open(out / "sheet.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "photo", "caption", "verdict"])
        w.writerows([n, f"{photos.name}/{image}", caption, ""] for n, (_, image, caption) in enumerate(rows, 1))
    with open(out / "key.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "source", "image"])
        w.writerows([n, system, image] for n, (system, image, _) in enumerate(rows, 1))
    print(f"{len(rows)} captions of {len(images)} photos -> {out}/sheet.csv (key: {out}/key.csv)")


def make_form(args) -> None:
    """A well-formed sheet (id, caption, well_formed) of the captions of truth sheets, shuffled together,
    for readers who do not see the photos; its key (id, source, style, image) for `score`."""
    rows = []
    for folder in map(Path, args.truth_sheets):
        key = {r["id"]: r for r in csv.DictReader(open(folder / "key.csv"))}
        rows += [(key[r["id"]]["source"], key[r["id"]]["image"], r["caption"]) for r in csv.DictReader(open(folder / "sheet.csv"))]
    random.Random(args.seed).shuffle(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "sheet.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "caption", "well_formed"])
        w.writerows([n, caption, ""] for n, (_, _, caption) in enumerate(rows, 1))
    with open(out / "key.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "source", "style", "image"])
        w.writerows([n, source, "factual", image] for n, (source, image, _) in enumerate(rows, 1))
    print(f"{len(rows)} captions -> {out}/sheet.csv (key: {out}/key.csv)")


def truth(args) -> None:
    """Shares of captions a reader who saw the photos found true, partly true and false, per source
    (a sheet of id, photo, caption, verdict: docs/blind_rating.md, "Truth to the photo")."""
    folder = Path(args.folder)
    key = {r["id"]: r for r in csv.DictReader(open(folder / "key.csv"))}
    counts: dict[str, dict[str, int]] = {}
    for path in sorted(folder.glob("ratings*.csv")):
        for r in csv.DictReader(open(path)):
            source = counts.setdefault(key[r["id"]]["source"], {"true": 0, "partly": 0, "false": 0})
            source[r["verdict"].strip().lower()] += 1
    print("| captions | n | true | partly true | false |\n|---|---:|---:|---:|---:|")
    result = {}
    for source, c in counts.items():
        n = sum(c.values())
        result[source] = {"n": n, **{k: round(v / n, 3) for k, v in c.items()}}
        print(f"| {source} | {n} | {c['true'] / n:.0%} | {c['partly'] / n:.0%} | {c['false'] / n:.0%} |")
    (folder / "results.json").write_text(json.dumps(result, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("make", help="write the sheet and its key")
    m.add_argument("--captions", nargs="+", required=True, metavar="[SYSTEM:]STYLE=FILE",
                   help="captions of one system in one style; several systems are rated on the same images")
    m.add_argument("--style-file", required=True)
    m.add_argument("--per-group", type=int, default=30)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--out", required=True)
    m.set_defaults(func=make)
    s = sub.add_parser("score", help="the table from the reader's ratings.csv")
    s.add_argument("folder")
    s.add_argument("--model", nargs="?", const="", default=None,
                   help="also check the fluency judge of this model folder (no value: the shipped model)")
    s.add_argument("--save-to-model", nargs="?", const="", default=None, metavar="DIR",
                   help="record the results in this model folder's metrics.json, under blind_ratings "
                        "(no value: the shipped model)")
    s.set_defaults(func=score)
    mf = sub.add_parser("make-form", help="write a well-formed sheet of the captions of truth sheets (no photos)")
    mf.add_argument("truth_sheets", nargs="+", metavar="FOLDER", help="folders made by make-truth")
    mf.add_argument("--seed", type=int, default=0)
    mf.add_argument("--out", required=True)
    mf.set_defaults(func=make_form)
    mt = sub.add_parser("make-truth", help="write a truth sheet (captions of photos the reader sees) and its key")
    mt.add_argument("--captions", nargs="+", required=True, metavar="SYSTEM=FILE",
                    help="factual captions ({image: caption}) of one system; all are rated on the same photos")
    mt.add_argument("--photos-dir", required=True, help="the folder the image names are relative to")
    mt.add_argument("--photos", type=int, default=30, help="photos drawn at random (default 30)")
    mt.add_argument("--images-of", metavar="KEY", help="the photos of this earlier key.csv instead of a draw")
    mt.add_argument("--changed-only", action="store_true", help="only photos whose captions differ between the systems")
    mt.add_argument("--seed", type=int, default=0)
    mt.add_argument("--out", required=True)
    mt.set_defaults(func=make_truth)
    t = sub.add_parser("truth", help="the table of a truth rating (photos seen: true, partly, false)")
    t.add_argument("folder")
    t.set_defaults(func=truth)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
