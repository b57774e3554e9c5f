"""Build the concept table (concepts.json): each ImageNet class -> the plain word a caption uses.

    apt-get install -y wordnet-base        # Debian's WordNet 3.0, under /usr/share/wordnet
    python -m aicrl.model.build_concepts --out aicrl/pretrained/concepts.json \
        --captions ../shared/data/flickr8k/Flickr8k.token.txt ../shared/data/coco_text/captions_text.jsonl \
        --synonyms ../shared/data/chair/synonyms.txt

Each class is a WordNet synset (imagenet_wnids.txt, classifier order). Its word is chosen from data:
walk up the hypernym chain (the class first) and take the first lemma that human captions use
often (MIN_COUNT); a hypernym lemma much more common still (RATIO, within LOOKAHEAD steps) wins, so
"dalmatian" and "golden retriever" become "dog" while "zebra" stays "zebra". Abstract hypernyms
(STOP) end the walk; OVERRIDES fix the few classes where caption frequency picks the wrong sense.
The COCO class is the first of the chain's lemmas (up to the chosen word) that the CHAIR synonyms
name. Each word's forms (for "does this caption mention it") are its lemmas, the lemmas of its
WordNet hyponyms that captions use and its COCO class's CHAIR synonyms ("airliner" -> "plane", "jet":
so the COCO caption text teaches the decoder the concept), with plurals. The caption counts are used only here.
Needs nltk (a dependency) and the wordnet-base files; it is not needed at run time.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
from collections import Counter, deque
from pathlib import Path

from ..hallucination import read_synonyms
from .concepts import FILE, PERSON_WORDS, plural
from .tags import imagenet_classes

WORDNET_DIR = Path("/usr/share/wordnet")
MIN_COUNT = 3  # uses in the caption text for a lemma to count as a caption word
RATIO = 50  # a hypernym this many times more common replaces the word ("dalmatian" -> "dog")
LOOKAHEAD = 4  # hypernym steps a more common word may be found within
SENSES = 2  # a lemma speaks for a synset only where it is one of the lemma's commonest senses
MIN_FORM_COUNT = 5  # uses for a hyponym lemma to join a word's forms ("puppy" for "dog")
STOP = {  # too abstract to say anything in a caption: the walk ends before these
    "entity.n.01", "physical_entity.n.01", "object.n.01", "whole.n.02", "artifact.n.01",
    "instrumentality.n.03", "organism.n.01", "living_thing.n.01", "matter.n.03", "substance.n.07",
    "abstraction.n.06", "thing.n.12", "unit.n.03", "commodity.n.01", "consumer_goods.n.01",
    "causal_agent.n.01", "food.n.02", "food.n.01", "solid.n.01", "geological_formation.n.01",
    "covering.n.02", "device.n.01", "structure.n.01", "container.n.01", "implement.n.01",
    "equipment.n.01", "conveyance.n.03", "vehicle.n.01", "article.n.02", "creation.n.02",
    "natural_object.n.01", "plant_part.n.01", "communication.n.02", "line.n.18",
    "game.n.04",  # "animal hunted for food": the walk would reach "animal" before "bird"
}
SKIP = {  # hypernyms whose lemmas captions use in another sense: the walk passes over them
    "weapon.n.01",
}
# Foxes and wolves are canines, lions wild cats and balloons aircraft, but not COCO's dogs, cats and
# airplanes: the COCO match does not pass through these.
COCO_SKIP = {"canine.n.02", "feline.n.01", "big_cat.n.01", "wildcat.n.03", "aircraft.n.01"}
OVERRIDES = {  # label -> (word, coco class or None), where the commonest lemma has another sense
    "kite": ("bird", "bird"),  # the bird of prey, not the toy
    "toilet seat": ("toilet", "toilet"),  # a seat, but photos of it show a toilet
    "crane bird": ("bird", "bird"),
    "teddy": ("teddy bear", "teddy bear"),
    "monitor": ("monitor", "tv"),
    "screen": ("screen", "tv"),
    "television": ("television", "tv"),
    "desktop computer": ("computer", "tv"),  # its photos show the screen
    "espresso": ("coffee", None),
    "ox": ("cow", "cow"),
    "Granny Smith": ("apple", "apple"),
    "hotdog": ("hot dog", "hot dog"),
    "bow": ("bow", None),  # the archer's bow, not a bow tie
    "submarine": ("submarine", None),
    "ear": ("corn", None),  # an ear of corn
    "cup": ("cup", "cup"),
    "mouse": ("mouse", "mouse"),  # the computer mouse
    "notebook": ("laptop", "laptop"),
    "tusker": ("elephant", "elephant"),
    "sorrel": ("horse", "horse"),
    "groom": ("man", "person"),
    "pitcher": ("pitcher", None),  # the jug, not the baseball player
    "mixing bowl": ("bowl", "bowl"),
    "soup bowl": ("bowl", "bowl"),
    "radio": ("radio", None),
    "mushroom": ("mushroom", None),
    "racket": ("racket", "tennis racket"),
    "tabby": ("cat", "cat"),  # "tabby" is common enough to keep, but "cat" is what most captions say
    "purse": ("purse", "handbag"),
    "motor scooter": ("scooter", "motorcycle"),
    # ImageNet's word where captions have another: COCO's photos of these say "sink", "train", "beach"
    "washbasin": ("sink", "sink"),
    "passenger car": ("train", "train"),  # the railway carriage, not COCO's car
    "seashore": ("beach", None),
    "lampshade": ("lamp", None),
    "quilt": ("bed", "bed"),  # its photos show a made bed
}
# nltk's reader wants WordNet's lexnames file, which Debian's package leaves out (lexnames(5WN)).
LEXNAMES = """adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute
noun.body noun.cognition noun.communication noun.event noun.feeling noun.food noun.group
noun.location noun.motive noun.object noun.person noun.phenomenon noun.plant noun.possession
noun.process noun.quantity noun.relation noun.shape noun.state noun.substance noun.time verb.body
verb.change verb.cognition verb.communication verb.competition verb.consumption verb.contact
verb.creation verb.emotion verb.motion verb.perception verb.possession verb.social verb.stative
verb.weather adj.ppl""".split()
POS_NUMBER = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}


def open_wordnet(folder: Path, staging: Path):
    """nltk's WordNetCorpusReader over Debian's files (copied into `staging`: nltk refuses links
    that leave its corpus root; plus lexnames)."""
    import nltk.data
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    if not (folder / "data.noun").is_file():
        sys.exit(f"error: no WordNet 3.0 in {folder} (apt-get install -y wordnet-base)")
    for f in folder.iterdir():
        if f.is_file():
            shutil.copyfile(f, staging / f.name)
    (staging / "lexnames").write_text("".join(
        f"{i:02d}\t{name}\t{POS_NUMBER[name.split('.')[0]]}\n" for i, name in enumerate(LEXNAMES)))
    nltk.data.path.append(str(staging))  # nltk only reads corpora under its data paths

    class Reader(WordNetCorpusReader):
        def map_wn(self, version="wordnet"):
            return None  # this is WordNet 3.0 itself: no mapping to nltk's downloadable copy

    return Reader(str(staging), None)


def caption_counts(files: list[Path]) -> Counter:
    """Uses of each word and two-word phrase in the caption files (Flickr8k token or jsonl)."""
    counts: Counter = Counter()
    for path in files:
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            text = json.loads(line)["caption"] if path.suffix == ".jsonl" else line.split("\t", 1)[-1]
            words = re.findall(r"[a-z]+", text.lower())
            counts.update(words)
            counts.update(" ".join(pair) for pair in zip(words, words[1:]))
    return counts


def lemma_text(lemma) -> str:
    return lemma.name().replace("_", " ").lower()


def common_lemmas(wordnet, synset, senses: int = SENSES) -> list[str]:
    """The synset's lemmas for which it is one of their `senses` commonest senses."""
    return [lemma_text(lemma) for lemma in synset.lemmas()
            if synset in wordnet.synsets(lemma.name(), "n")[:senses]]


def hypernym_chain(synset) -> list:
    """The synset and its hypernyms, nearest first (breadth first), up to the first STOP one."""
    chain, queue, seen = [], deque([synset]), {synset}
    while queue:
        current = queue.popleft()
        if current.name() in STOP:
            continue
        chain.append(current)
        for parent in current.hypernyms() + current.instance_hypernyms():
            if parent not in seen:
                seen.add(parent)
                queue.append(parent)
    return chain


def choose_word(wordnet, chain: list, counts: Counter) -> tuple[str, int]:
    """(word, index in the chain of its synset): the first common lemma, or a far commoner one
    a few steps up. A lemma counts only for its commonest senses: "monitor" is a screen in
    captions, not a lizard."""
    def best(synset) -> tuple[int, str]:
        return max(((counts[t], t) for t in common_lemmas(wordnet, synset)), default=(0, ""))

    for i, synset in enumerate(chain):
        if synset.name() in SKIP:
            continue
        count, word = best(synset)
        if count >= MIN_COUNT:
            for j in range(i + 1, min(i + 1 + LOOKAHEAD, len(chain))):
                higher, higher_word = best(chain[j]) if chain[j].name() not in SKIP else (0, "")
                if higher >= RATIO * count:
                    count, word, i = higher, higher_word, j
            return word, i
    return lemma_text(chain[0].lemmas()[0]), 0


def coco_class(wordnet, chain: list, word: str, synonyms: dict[str, str]) -> str | None:
    """The COCO class of the word, else of the first lemma up the chain that names one."""
    names = [word] + [t for s in chain if s.name() not in COCO_SKIP for t in common_lemmas(wordnet, s)]
    return next((synonyms[n] for n in names if n in synonyms), None)


def word_forms(wordnet, word: str, synset, counts: Counter, coco_names: list[str] = ()) -> list[str]:
    """The word, its synset's lemmas and its hyponyms' lemmas that captions use (as their first
    sense: "dog" is also a person in WordNet), and `coco_names` (its COCO class's synonyms), with
    plurals."""
    forms = {word, *coco_names}
    if synset is not None and word not in PERSON_WORDS:  # concepts.PERSON_WORDS: WordNet's are too many
        for s in [synset, *synset.closure(lambda s: s.hyponyms())]:
            forms.update(t for t in common_lemmas(wordnet, s, senses=1) if counts[t] >= MIN_FORM_COUNT)
    return sorted(forms | {plural(f) for f in forms})


def coco_names(classes: list[dict], synonyms: dict[str, str]) -> dict[str, list[str]]:
    """word -> the CHAIR synonyms of its COCO class; where one of the class's words is the class
    itself ("dog"), only that word takes them (a puppy is a dog, not a greyhound), else each of its
    words does ("airliner" and "warplane" both take "jet" and "plane"). Not for people, whose words
    concepts.PERSON_WORDS keeps."""
    by_class: dict[str, list[str]] = {}
    for name, coco in synonyms.items():
        by_class.setdefault(coco, []).append(name)
    words_of: dict[str, list[str]] = {}
    for c in classes:
        if c["coco"] and c["coco"] != "person" and c["word"] not in PERSON_WORDS:
            words_of.setdefault(c["coco"], []).append(c["word"])
    out: dict[str, list[str]] = {}
    for coco, words in words_of.items():
        for word in [coco] if coco in words else words:
            out[word] = by_class.get(coco, [])
    return out


def build(wordnet, wnids: list[str], counts: Counter, synonyms: dict[str, str]) -> dict:
    labels = imagenet_classes()
    classes, word_synsets = [], {}
    for label, wnid in zip(labels, wnids):
        synset = wordnet.synset_from_pos_and_offset("n", int(wnid[1:]))
        chain = hypernym_chain(synset)
        if label in OVERRIDES:
            word, coco = OVERRIDES[label]
            found = [s for s in chain if word in map(lemma_text, s.lemmas())]
            word_synsets.setdefault(word, found[0] if found else None)
        else:
            word, at = choose_word(wordnet, chain, counts)
            coco = coco_class(wordnet, chain, word, synonyms)
            word_synsets.setdefault(word, chain[at])
        classes.append({"label": label, "wnid": wnid, "word": word, "coco": coco})
    names = coco_names(classes, synonyms)
    forms = {w: word_forms(wordnet, w, s, counts, names.get(w, [])) for w, s in sorted(word_synsets.items())}
    return {"source": "WordNet 3.0 hypernyms, words chosen by use in Flickr8k and COCO captions "
                      "(aicrl/model/build_concepts.py)", "classes": classes, "forms": forms}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parents[1] / "pretrained" / FILE)
    parser.add_argument("--captions", type=Path, nargs="+", required=True)
    parser.add_argument("--synonyms", type=Path, required=True, help="CHAIR synonyms.txt")
    parser.add_argument("--wordnet", type=Path, default=WORDNET_DIR)
    args = parser.parse_args(argv)
    for path in [*args.captions, args.synonyms]:
        if not path.is_file():
            sys.exit(f"error: no such file: {path}")
    wnids = (Path(__file__).parent / "imagenet_wnids.txt").read_text().split()
    with tempfile.TemporaryDirectory() as staging:
        wordnet = open_wordnet(args.wordnet, Path(staging))
        table = build(wordnet, wnids, caption_counts(args.captions), read_synonyms(args.synonyms))
    args.out.write_text(json.dumps(table, indent=1) + "\n")
    summary(table)
    print(f"wrote {args.out}")


def summary(table: dict) -> None:
    classes = table["classes"]
    words = Counter(c["word"] for c in classes)
    with_coco = sum(c["coco"] is not None for c in classes)
    print(f"{len(classes)} classes -> {len(words)} words; {with_coco} map to a COCO class")
    print("commonest words:", ", ".join(f"{w} {n}" for w, n in words.most_common(15)))


if __name__ == "__main__":
    main()
