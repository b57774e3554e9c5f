"""Concepts: the encoder's 1,000 ImageNet classes as the plain words people use in captions.

ImageNet names breeds and varieties ("tabby", "dalmatian", "Granny Smith", "espresso"); captions
say "cat", "dog", "apple", "coffee". The table (FILE in the model folder, built from WordNet by
build_concepts.py) gives each class its caption `word` and the COCO object class it belongs to
(`coco`, or None), and each word's `forms` (plurals, kinds: "dog" -> "dogs", "puppy") so a caption
can be checked for a mention. Numpy only: it runs in the torch-free base install.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .folder import ModelFolder

FILE = ModelFolder.CONCEPTS
# Words that name a person or a dog in a caption (from the CHAIR synonyms of COCO's "person" and
# "dog", Rohrbach et al. 2018, plus the plurals and everyday words Flickr8k's captions use). Words
# that often name things ("pitcher", "fan") are left out.
PERSON_WORDS = frozenset("""
person people persons man men woman women boy boys girl girls child children kid kids baby babies
adult adults guy guys lady ladies gentleman gentlemen teenager teenagers toddler toddlers player
players rider riders biker bikers skier skiers snowboarder snowboarders skater skaters skateboarder
skateboarders surfer surfers swimmer swimmers climber climbers crowd worker workers mother father
bride groom couple family friends student students soldier soldiers officer officers policeman cop
chef chefs male males female females passenger passengers driver drivers sister sisters brother
brothers cowboy cowgirl hunter walker bicyclist bicyclists cyclist cyclists motorcyclist
motorcyclists pedestrian pedestrians hiker hikers runner runners jogger kayaker athlete athletes
dancer dancers musician musicians singer performer audience spectators tourists someone somebody
individual individuals infant teen teens dad mom son daughter wife husband batter catcher umpire
referee goalie wrestler wrestlers boxer gymnast fisherman sailor clown clowns vendor
""".split())
DOG_WORDS = frozenset("""
dog dogs puppy puppies pup pups doggy doggie canine canines hound hounds terrier terriers poodle
poodles retriever retrievers labrador labradors collie collies spaniel spaniels bulldog bulldogs
beagle beagles greyhound greyhounds husky huskies dachshund dachshunds pug pugs sheepdog mutt
""".split())
# An activity names its gear: "a man is skiing" names the skis the ImageNet head sees, so the check
# does not call them missed (`ConceptTable.words_of`). Only activities that need the thing.
ACTIVITIES = {word: frozenset(forms.split()) for word, forms in {
    "ski": "skiing", "snowmobile": "snowmobiling", "canoe": "canoeing kayaking", "sled": "sledding",
    "dog sled": "sledding", "parachute": "parachuting skydiving parasailing", "snorkel": "snorkeling",
    "bike": "biking cycling bicycling", "mountain bike": "biking cycling", "sailboat": "sailing",
    "unicycle": "unicycling"}.items()}  # not "swinging": people swing bats and arms
# One-word forms of concept words that captions mostly use to describe ("a young man", "an orange
# shirt", "a giant clock", "a delicious pizza"): in a caption they name no concept (SentenceConcepts),
# or "two young girls" would claim an animal and "a man in an orange shirt" an orange.
DESCRIBING = frozenset("young male female males females human giant lower upper electric delicious orange semi "
                       "launch launches commuter console".split())
# ...and with the words that name no one thing ("an animal"), free to repeat (`Agreement.named_once`).
NOT_THINGS = DESCRIBING | frozenset("animal animals creature pet pets".split())
_IRREGULAR_PLURALS = {"man": "men", "woman": "women", "child": "children", "person": "people",
                      "mouse": "mice", "goose": "geese", "foot": "feet", "tooth": "teeth", "ox": "oxen",
                      "sheep": "sheep", "fish": "fish", "deer": "deer", "bison": "bison",
                      "knife": "knives", "leaf": "leaves", "wolf": "wolves", "shelf": "shelves",
                      "skis": "skis", "scissors": "scissors", "bus": "buses"}
_IRREGULAR_SINGULARS = {p: s for s, p in _IRREGULAR_PLURALS.items()}


def plural(word: str) -> str:
    """English plural of a noun or noun phrase (the last word inflects), by rule."""
    head, _, last = word.rpartition(" ")
    if last in _IRREGULAR_PLURALS:
        last = _IRREGULAR_PLURALS[last]
    elif re.search(r"(s|x|z|ch|sh)$", last):
        last += "es"
    elif re.search(r"[^aeiou]y$", last):
        last = last[:-1] + "ies"
    elif last:
        last += "s"
    return f"{head} {last}" if head else last


def singular(word: str) -> str:
    """The singular of a plural noun, by rule ("dogs" -> "dog", "buses" -> "bus", "men" -> "man");
    a singular word comes back unchanged (nltk's lemmatizer needs corpus data not installed)."""
    if word in _IRREGULAR_SINGULARS:
        return _IRREGULAR_SINGULARS[word]
    if len(word) <= 3 or word.endswith(("ss", "us", "is")):
        return word
    if word.endswith("ies"):
        return word[:-3] + "y"
    if re.search(r"(x|z|ch|sh|ss)es$", word):
        return word[:-2]
    if word.endswith("s"):
        return word[:-1]
    return word


def softmax(logits: np.ndarray) -> np.ndarray:
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    return probs / probs.sum(-1, keepdims=True)


def imagenet_probabilities(head: tuple[np.ndarray, np.ndarray], features: np.ndarray) -> np.ndarray:
    """(B, regions, dim) feature grids + the ImageNet head (weight, bias) -> (B, 1000) class
    probabilities (the head sits on the average-pooled grid)."""
    weight, bias = head
    return softmax(np.asarray(features, dtype=np.float32).mean(1) @ weight.T + bias)


class ConceptTable:
    """ImageNet class index -> caption word and COCO class; word -> its forms in a caption."""

    def __init__(self, classes: list[dict], forms: dict[str, list[str]], source: str = ""):
        self.classes, self.forms, self.source = classes, forms, source
        self.labels = [c["label"] for c in classes]
        self.words = [c["word"] for c in classes]
        self.coco = [c.get("coco") for c in classes]
        self.vocabulary = sorted(set(self.words))  # distinct words, the columns of `word_matrix`
        column = {w: i for i, w in enumerate(self.vocabulary)}
        self.word_index = np.array([column[w] for w in self.words])
        self._forms = {w: frozenset(f) for w, f in forms.items()}

    @classmethod
    def load(cls, model_dir: str | Path) -> "ConceptTable | None":
        """The table in `model_dir`, or None where the folder has none (an older model)."""
        path = Path(model_dir) / FILE
        return cls.read(path) if path.is_file() else None

    @classmethod
    def read(cls, path: str | Path) -> "ConceptTable":
        table = json.loads(Path(path).read_text(encoding="utf-8"))
        return cls(table["classes"], table.get("forms", {}), table.get("source", ""))

    def save(self, model_dir: str | Path) -> None:
        table = {"source": self.source, "classes": self.classes, "forms": self.forms}
        (Path(model_dir) / FILE).write_text(json.dumps(table, indent=1) + "\n", encoding="utf-8")

    def word_probabilities(self, probs: np.ndarray) -> np.ndarray:
        """(B, classes) class probabilities -> (B, len(vocabulary)) word probabilities: each word
        gets the sum over its classes (every dog breed adds to "dog")."""
        probs = np.asarray(probs, dtype=np.float64)
        if probs.ndim != 2 or probs.shape[1] != len(self.words):
            raise ValueError(f"expected (batch, {len(self.words)}) class probabilities, got {probs.shape}")
        out = np.zeros((probs.shape[0], len(self.vocabulary)))
        np.add.at(out.T, self.word_index, probs.T)
        return out

    def concept_probabilities(self, probs: np.ndarray, min_probability: float = 0.0) -> list[dict[str, float]]:
        """Per image, {word: probability} for the words at or above `min_probability`, most likely first."""
        rows = []
        for row in self.word_probabilities(probs):
            order = np.argsort(-row, kind="stable")
            rows.append({self.vocabulary[i]: float(row[i]) for i in order if row[i] >= min_probability
                         and row[i] > 0})
        return rows

    def words_of(self, word: str) -> set[str]:
        """The forms a caption may use for `word`: itself, its plural, the kinds WordNet puts under it
        that captions use ("dog" -> "dogs", "puppy", "puppies", ...), and its activity ("skiing")."""
        named = {"person": PERSON_WORDS, "man": PERSON_WORDS, "dog": DOG_WORDS}.get(word, frozenset())
        return set(self._forms.get(word, ())) | named | ACTIVITIES.get(word, frozenset()) | {word, plural(word)}

    def coco_of(self, word: str) -> str | None:
        """The COCO class of a word's classes (the first that has one), or None."""
        return next((c for w, c in zip(self.words, self.coco) if w == word and c), None)


# --- concepts as decoder input (config.concept_tokens) ---

PERSON = "person"  # the one concept ImageNet has no class for: a probe on the grid gives it (PersonHead)
PERSON_HEAD_FILE = ModelFolder.PERSON_HEAD  # in a grounded model folder: weight (1000,), bias ()


class PersonHead:
    """P(a person is in the photo). The probe: one weight per ImageNet class (jerseys, skis and grooms
    speak for a person; dalmatians against) over a fixed negative bias, fitted on Flickr8k's training
    photos (grounding.fit_person_head). The bias is fixed, not fitted, so a photo whose classes
    Flickr8k never showed (food, rooms) gets no person: a probe on the grid itself learnt Flickr8k's
    base rate (74% people) and saw people in most everyday photos. With `mix` (grounding.fit_person_mix)
    and the scores of the person and face detectors (model/people.py), the probe's and detectors'
    log-odds are mixed: mix[:3] weigh probe, pose and face, mix[3] is the bias."""

    # Below these P(person) rules a person out: the probe's fixed bias keeps it low, so a quarter;
    # the mix is fitted with even classes, so even odds (on coco_mini's photos without a person it
    # then lets one into 13% of them, against 35% at a quarter; on 400 Flickr8k test photos CIDEr
    # 0.455 -> 0.448).
    PROBE_ABSENT, MIX_ABSENT = 0.25, 0.5

    def __init__(self, weight: np.ndarray, bias: float, mix: np.ndarray | None = None):
        self.weight, self.bias = np.asarray(weight, dtype=np.float32), float(bias)
        self.mix = None if mix is None else np.asarray(mix, dtype=np.float32)

    def absent(self, detections: np.ndarray | None) -> float:
        """The P(person) below which there is no person, for P from these detections (or none)."""
        return self.MIX_ABSENT if self.mix is not None and detections is not None else self.PROBE_ABSENT

    def __call__(self, imagenet_probs: np.ndarray, detections: np.ndarray | None = None) -> np.ndarray:
        """(B,) P(person) from (B, 1000) class probabilities, and the detectors' (B, 2) scores
        where there are a mix and detections (else the probe alone)."""
        probe = 1.0 / (1.0 + np.exp(-(np.asarray(imagenet_probs, dtype=np.float32) @ self.weight + self.bias)))
        if self.mix is None or detections is None:
            return probe
        x = np.concatenate([log_odds(probe)[:, None], log_odds(detections)], 1)  # as fit_person_mix saw them
        return 1.0 / (1.0 + np.exp(-(x @ self.mix[:3] + self.mix[3])))

    def save(self, model_dir: str | Path) -> None:
        mix = {} if self.mix is None else {"mix": self.mix}
        np.savez(Path(model_dir) / PERSON_HEAD_FILE, weight=self.weight, bias=np.float32(self.bias), **mix)

    @classmethod
    def load(cls, model_dir: str | Path) -> "PersonHead | None":
        path = Path(model_dir) / PERSON_HEAD_FILE
        if not path.is_file():
            return None
        with np.load(path) as f:
            return cls(f["weight"], float(f["bias"]), f["mix"] if "mix" in f else None)


def log_odds(p: np.ndarray, eps: float = 1e-4) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float32), eps, 1 - eps)
    return np.log(p / (1 - p))


def concept_names(table: ConceptTable) -> list[str]:
    """The decoder's concepts in id order (id 0 is "none"): the table's words, then PERSON."""
    return [*table.vocabulary, PERSON]


def top_concepts(word_probs: np.ndarray, person_probs: np.ndarray, k: int,
                 min_probability: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """(B, words) word probabilities and (B,) person probabilities -> the decoder's concept input:
    (B, k) ids (1-based, 0 = none) and probabilities. The person concept always takes one slot
    (its absence is news too); the words fill the rest, most likely first, above `min_probability`."""
    B, n_words = word_probs.shape
    ids, probs = np.zeros((B, k), np.int64), np.zeros((B, k), np.float32)
    ids[:, 0], probs[:, 0] = n_words + 1, person_probs
    best = np.argsort(-word_probs, axis=1, kind="stable")[:, :k - 1]
    p = np.take_along_axis(word_probs, best, 1)
    keep = p >= min_probability
    ids[:, 1:], probs[:, 1:] = np.where(keep, best + 1, 0), np.where(keep, p, 0)
    return ids, probs


class SentenceConcepts:
    """The concepts a human caption names ("two zebras graze" -> zebra): the input a grounded decoder
    learns to write from when a caption comes without its photo (COCO caption text)."""

    def __init__(self, table: ConceptTable):
        names = concept_names(table)
        self.person = len(names)
        self.forms: dict[tuple[str, ...], int] = {}
        own = {i: {word, plural(word)} - PERSON_WORDS for i, word in enumerate(names[:-1], 1)}
        kinds = {i: table.words_of(word) - PERSON_WORDS - {PERSON} for i, word in enumerate(names[:-1], 1)}
        # A form names the concept whose own word it is ("zebras": zebra), else the narrowest concept
        # that has it among its kinds (not "animal", which has them all).
        for i, forms in [*own.items(), *sorted(kinds.items(), key=lambda kv: len(kv[1]))]:
            for form in sorted(forms - DESCRIBING):
                self.forms.setdefault(tuple(form.split()), i)
        self.longest = max(len(f) for f in self.forms)

    def __call__(self, words: list[str]) -> list[int]:
        found, i = [], 0
        while i < len(words):
            for n in range(min(self.longest, len(words) - i), 0, -1):
                concept = self.forms.get(tuple(words[i:i + n]))
                if concept is not None:
                    found.append(concept)
                    i += n - 1
                    break
            i += 1
        if any(w in PERSON_WORDS for w in words):
            found.append(self.person)
        return list(dict.fromkeys(found))


# --- does a caption agree with what the encoder sees? ---

@dataclass
class Seen:
    """What the encoder sees in one photo: each table word's probability, and P(person) (None
    where the model has no person probe), below `person_absent` a person is ruled out
    (PersonHead.absent: the probe's and the mix's calibrations differ)."""
    words: np.ndarray  # (len(table.vocabulary),)
    person: float | None
    person_absent: float = PersonHead.PROBE_ABSENT


class Agreement:
    """Checks a caption against the photo's concepts: which things it names that the encoder does
    not see (`unsupported`: a person the probe rules out, an object the ImageNet head gives almost
    no probability), which confident concepts it leaves out (`missed`), and a confidence in [0, 1]
    from both. Checked are a person and a dog anywhere (what a Flickr8k decoder invents), and the
    caption's subject, its first object with a COCO class: ImageNet's head sees a photo's main
    object, not the bed under the cat, and "a field" or "the air" are never called unsupported."""

    OBJECT_ABSENT = 0.02  # an object class below this: unsupported
    DOG_ABSENT = 0.15  # 120 dog breeds gather some probability in any photo; on a dog photo it is near 1
    CONFIDENT = 0.5  # a concept at or above this should be named

    def __init__(self, table: ConceptTable):
        self.names = concept_names(table)
        self.person = len(self.names)
        self.find = SentenceConcepts(table)
        self.objects = {i for i, w in enumerate(self.names[:-1], 1) if table.coco_of(w)}
        self.always = {self.person} | ({self.names.index("dog") + 1} if "dog" in self.names else set())

    def check(self, words: list[str], seen: Seen) -> dict:
        named = self.find(words)
        subject = next((i for i in named if i in self.objects), None)
        checked = [i for i in named if (i in self.always or i == subject)
                   and not (i == self.person and seen.person is None)]
        unsupported, missed = [], []
        for i in checked:
            support = seen.person if i == self.person else seen.words[i - 1]
            if support < self._absent(i, seen):
                unsupported.append(self.names[i - 1])
        confident = [i + 1 for i in np.flatnonzero(seen.words >= self.CONFIDENT)]
        if seen.person is not None and seen.person >= self.CONFIDENT:
            confident.append(self.person)
        missed = [self.names[i - 1] for i in confident if i not in named]
        confidence = (1 - len(unsupported) / max(1, len(checked))) * (1 - len(missed) / max(1, len(confident)))
        return {"confidence": round(confidence, 3), "unsupported": unsupported, "missed": missed}

    def _absent(self, concept: int, seen: Seen) -> float:
        """Below this probability a concept named by a caption is unsupported."""
        if concept == self.person:
            return seen.person_absent
        return self.DOG_ABSENT if self.names[concept - 1] == "dog" else self.OBJECT_ABSENT

    def _word_ids(self, stoi: dict[str, int]) -> dict[int, list[int]]:
        """Concept -> the vocabulary ids of its one-word forms; built once per vocabulary."""
        if getattr(self, "_ids_for", None) is not stoi:
            self._ids_for, self._ids = stoi, {}
            for form, concept in self.find.forms.items():
                if len(form) == 1 and form[0] in stoi:
                    self._ids.setdefault(concept, []).append(stoi[form[0]])
        return self._ids

    def named_once(self, stoi: dict[str, int]) -> np.ndarray:
        """(V,) the words a caption should say at most once: the one-word names of the concepts that
        are COCO object classes (a pizza, a cat, a bus), but people and dogs ("a man and a man", "a
        black dog and a brown dog" are Flickr8k's own) and words that also describe (NOT_THINGS)."""
        once = np.zeros(max(stoi.values()) + 1, dtype=bool)
        for concept, ids in self._word_ids(stoi).items():
            once[ids] = concept in self.objects
        once[[stoi[w] for w in PERSON_WORDS | DOG_WORDS | NOT_THINGS if w in stoi]] = False
        return once

    def word_bonus(self, seen: list[Seen], stoi: dict[str, int], bonus: float, penalty: float,
                   likely: float = 0.3) -> np.ndarray:
        """(B, V) logit changes for decoding: the words of a concept the encoder finds likely (p >= `likely`)
        gain `bonus` * p; person words lose `penalty` where the probe rules a person out, and dog
        words where the head gives a dog almost nothing (Agreement's thresholds)."""
        words_of = self._word_ids(stoi)
        person_ids = [stoi[w] for w in PERSON_WORDS if w in stoi]
        dog = self.names.index("dog") + 1 if "dog" in self.names else None
        out = np.zeros((len(seen), max(stoi.values()) + 1), np.float32)
        for b, s in enumerate(seen):
            for i in np.flatnonzero(s.words >= likely):
                out[b, words_of.get(i + 1, [])] += bonus * s.words[i]
            if s.person is not None and s.person < s.person_absent:
                out[b, person_ids] -= penalty
            if dog is not None and s.words[dog - 1] < self.DOG_ABSENT:
                out[b, words_of.get(dog, [])] -= penalty
        return out
