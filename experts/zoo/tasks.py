"""The task suite: seeded, checkable prompts with exact answers in three domains.

- `arith`: integer `+ - *` with 1 to 5 digit operands; difficulty from the digits and the operator.
- `text`: string operations on random words (reverse, sort letters, count a letter, ...);
  difficulty from the word's length.
- `facts`: questions about a synthetic world of invented countries (capital, founding year, flag
  colour, national animal). Training data asks about country `r` (its popularity rank) with a
  Zipf-Mandelbrot frequency ~ 1/(r + q), so the head is seen often and the tail rarely;
  difficulty is the popularity band (head, torso, tail).

A prompt's split (`train` / `calib` / `test`) is a function of its text alone (a hash), so the
splits never share a prompt however many are drawn. The `heldout` split asks the same operations
in a family of phrasings (`HELDOUT_TEMPLATES`) that no training or calibration prompt uses, so it
measures how the zoo and the router generalise beyond the training templates. Answers are checked
by exact match after normalising whitespace. This module needs only the standard library.
"""

from __future__ import annotations

import functools
import hashlib
import random
import string
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

DOMAINS = ("arith", "text", "facts")
DIFFICULTIES = (1, 2, 3)
SPLITS = {"train": 0.8, "calib": 0.1, "test": 0.1}  # share of the prompt space
HELDOUT = "heldout"  # the split of the held-out phrasing family, outside the hashed space
EVAL_SPLITS = (*SPLITS, HELDOUT)

WORLD_SEED = 20240611
NUM_ENTITIES = 3000
ZIPF_OFFSET = 5.0  # Zipf-Mandelbrot q: weight of rank r is 1 / (r + q)
POPULARITY_BANDS = ((0, 100), (100, 1000), (1000, NUM_ENTITIES))  # difficulty 1, 2, 3 ranks


@dataclass(frozen=True)
class Task:
    """One prompt with its exact answer."""

    domain: str
    difficulty: int  # 1 easy .. 3 hard
    kind: str  # the operation or attribute, e.g. "add", "reverse", "capital"
    prompt: str  # the user message
    answer: str
    heldout: bool = False  # phrased with a held-out template (the `heldout` split)

    @property
    def id(self) -> str:
        """Stable id, a function of the prompt text."""
        return f"{self.domain}-{_digest(self.prompt)[:12]}"

    @property
    def split(self) -> str:
        return HELDOUT if self.heldout else split_of(self.prompt)

    @property
    def messages(self) -> tuple[dict, ...]:
        return ({"role": "user", "content": self.prompt},)


def normalize(text: str) -> str:
    return " ".join(text.split())


def is_correct(prediction: str, answer: str) -> bool:
    return normalize(prediction) == normalize(answer)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def split_of(prompt: str) -> str:
    """The split a prompt belongs to: a hash of its normalised text mapped onto `SPLITS`."""
    u = int(_digest(normalize(prompt))[:15], 16) / 16**15
    edge = 0.0
    for name, share in SPLITS.items():
        edge += share
        if u < edge:
            return name
    return name


# -- arithmetic --------------------------------------------------------------------------------

# difficulty -> list of (operator, digits of a, digits of b) to draw from uniformly
ARITH_LEVELS = {
    1: [(op, da, db) for op in "+-" for da in (1, 2) for db in (1, 2)] + [("*", 1, 1)],
    2: [(op, da, db) for op in "+-" for da in (3, 4) for db in (1, 2, 3, 4)]
    + [("*", 2, 1), ("*", 1, 2), ("*", 2, 2)],
    3: [(op, 5, db) for op in "+-" for db in (3, 4, 5)]
    + [("*", da, db) for da in (3, 4, 5) for db in (1, 2)],
}
_OPS = {"+": ("add", lambda a, b: a + b), "-": ("sub", lambda a, b: a - b), "*": ("mul", lambda a, b: a * b)}


def _number(rng: random.Random, digits: int) -> int:
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


def make_arith(rng: random.Random, difficulty: int, *, heldout: bool = False) -> Task:
    op, da, db = rng.choice(ARITH_LEVELS[difficulty])
    a, b = _number(rng, da), _number(rng, db)
    kind, fn = _OPS[op]
    if heldout:
        prompt = rng.choice(HELDOUT_TEMPLATES[kind]).format(a=a, b=b)
        return Task("arith", difficulty, kind, prompt, str(fn(a, b)), heldout=True)
    return Task("arith", difficulty, kind, f"What is {a} {op} {b}?", str(fn(a, b)))


# -- text ------------------------------------------------------------------------------------

TEXT_LENGTHS = {1: (3, 4), 2: (5, 7), 3: (8, 10)}
TEXT_OPS = ("reverse", "sort", "count", "upper", "last", "length")


def _word(rng: random.Random, difficulty: int) -> str:
    lo, hi = TEXT_LENGTHS[difficulty]
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(lo, hi)))


def make_text(rng: random.Random, difficulty: int, *, heldout: bool = False) -> Task:
    word, op = _word(rng, difficulty), rng.choice(TEXT_OPS)
    if heldout:
        return _heldout_text(rng, difficulty, op, word)
    if op == "reverse":
        return Task("text", difficulty, op, f'Reverse the word "{word}".', word[::-1])
    if op == "sort":
        return Task("text", difficulty, op, f'Sort the letters of "{word}".', "".join(sorted(word)))
    if op == "count":
        letter = rng.choice(word) if rng.random() < 0.7 else rng.choice(string.ascii_lowercase)
        prompt = f'How many times does "{letter}" appear in "{word}"?'
        return Task("text", difficulty, op, prompt, str(word.count(letter)))
    if op == "upper":
        return Task("text", difficulty, op, f'Write "{word}" in capital letters.', word.upper())
    if op == "last":
        return Task("text", difficulty, op, f'What is the last letter of "{word}"?', word[-1])
    return Task("text", difficulty, op, f'How many letters are in "{word}"?', str(len(word)))


def _heldout_text(rng: random.Random, difficulty: int, op: str, word: str) -> Task:
    letter = ""
    if op == "count":
        letter = rng.choice(word) if rng.random() < 0.7 else rng.choice(string.ascii_lowercase)
    answer = {"reverse": word[::-1], "sort": "".join(sorted(word)), "count": str(word.count(letter)),
              "upper": word.upper(), "last": word[-1], "length": str(len(word))}[op]
    prompt = rng.choice(HELDOUT_TEMPLATES[op]).format(w=word, l=letter)
    return Task("text", difficulty, op, prompt, answer, heldout=True)


# -- facts -----------------------------------------------------------------------------------

COLOURS = ("red", "blue", "green", "yellow", "white", "black", "orange", "purple", "grey", "teal", "pink", "brown")
ANIMALS = ("wolf", "bear", "eagle", "otter", "lynx", "heron", "fox", "owl", "stag", "hare", "seal", "crane")
ATTRIBUTES = ("capital", "founded", "colour", "animal")
# Several phrasings of each question: the split hashes the whole prompt, so a fact asked in the
# test split with one phrasing is learnt in training from the others.
FACT_TEMPLATES = {
    "capital": (
        "What is the capital of {e}?",
        "Which city is the capital of {e}?",
        "Name the capital city of {e}.",
        "{e} has its capital in which city?",
        "The capital of {e} is which city?",
    ),
    "founded": (
        "In what year was {e} founded?",
        "When was {e} founded?",
        "What is the founding year of {e}?",
        "{e} was founded in which year?",
        "Which year saw the founding of {e}?",
    ),
    "colour": (
        "What colour is the flag of {e}?",
        "What is the flag colour of {e}?",
        "Which colour is the flag of {e}?",
        "The flag of {e} is what colour?",
        "{e} has a flag of which colour?",
    ),
    "animal": (
        "What is the national animal of {e}?",
        "Which animal is the symbol of {e}?",
        "Name the national animal of {e}.",
        "{e} has which national animal?",
        "The national animal of {e} is which?",
    ),
}
# The held-out phrasing family: other word order, wording and formatting for every operation and
# attribute. No training, calibration or test prompt uses these; only the `heldout` split does.
HELDOUT_TEMPLATES = {
    "add": ("Compute {a} plus {b}.", "{a}+{b}=?", "Add {a} and {b}.", "Sum of {a} and {b}:"),
    "sub": ("Compute {a} minus {b}.", "{a}-{b}=?", "Subtract {b} from {a}.",
            "Difference of {a} and {b}:"),
    "mul": ("Compute {a} times {b}.", "{a}*{b}=?", "Multiply {a} by {b}.",
            "Product of {a} and {b}:"),
    "reverse": ('Spell "{w}" backwards.', 'Write the word "{w}" in reverse order.',
                '"{w}" reversed is?'),
    "sort": ('Put the letters of "{w}" in alphabetical order.', '"{w}" with its letters sorted:',
             'Arrange the letters in "{w}" alphabetically.'),
    "count": ('Count the letter "{l}" in "{w}".', 'In "{w}", how often is "{l}" found?',
              'Number of "{l}" letters in "{w}":'),
    "upper": ('Uppercase "{w}".', 'Convert "{w}" to upper case.', '"{w}" in capitals:'),
    "last": ('Which letter ends "{w}"?', 'Final letter of "{w}":', '"{w}" ends with which letter?'),
    "length": ('Count the letters of "{w}".', 'What is the length of the word "{w}"?',
               'Length of "{w}":'),
    "capital": ("Tell me the capital of {e}.", "Capital of {e}?", "{e}: capital city?"),
    "founded": ("Tell me when {e} was founded.", "Founding year of {e}?", "{e}: year founded?"),
    "colour": ("Tell me the colour of the flag of {e}.", "Flag colour of {e}?",
               "{e}: colour of its flag?"),
    "animal": ("Tell me the national animal of {e}.", "National animal of {e}?",
               "{e}: national animal?"),
}
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "th", "br", "kr", "st", "dr", "gl")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ou")
_CODAS = ("", "", "", "n", "r", "l", "s", "th", "m", "x")


@dataclass(frozen=True)
class Entity:
    rank: int  # popularity rank, 0 = most often mentioned
    name: str
    capital: str
    founded: int
    colour: str
    animal: str

    def attribute(self, name: str) -> str:
        return str(getattr(self, name))


def _name(rng: random.Random, syllables: int) -> str:
    parts = [rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables)]
    return "".join(parts).capitalize()


@functools.lru_cache(maxsize=4)
def world(seed: int = WORLD_SEED, size: int = NUM_ENTITIES) -> tuple[Entity, ...]:
    """The synthetic world: `size` invented countries, each name and capital unique."""
    rng = random.Random(seed)
    used: set[str] = set()

    def fresh() -> str:
        while True:
            candidate = _name(rng, rng.choice((2, 3)))
            if candidate not in used:
                used.add(candidate)
                return candidate

    return tuple(
        Entity(r, fresh(), fresh(), rng.randint(1000, 1999), rng.choice(COLOURS), rng.choice(ANIMALS))
        for r in range(size)
    )


def popularity_band(rank: int) -> int:
    for difficulty, (lo, hi) in zip(DIFFICULTIES, POPULARITY_BANDS):
        if lo <= rank < hi:
            return difficulty
    raise ValueError(f"rank {rank} outside the world")


@functools.lru_cache(maxsize=4)
def _zipf_cumulative(size: int, offset: float) -> list[float]:
    total, out = 0.0, []
    for r in range(size):
        total += 1.0 / (r + 1 + offset)
        out.append(total)
    return out


def make_fact(rng: random.Random, difficulty: int | None = None, *, zipf: bool = False,
              heldout: bool = False) -> Task:
    """A question about one country: drawn by popularity (`zipf`, training) or uniformly within
    the band of `difficulty` (evaluation)."""
    entities = world()
    if zipf:
        cum = _zipf_cumulative(len(entities), ZIPF_OFFSET)
        entity = entities[rng.choices(range(len(entities)), cum_weights=cum)[0]]
    else:
        if difficulty is None:
            raise ValueError("make_fact needs a difficulty unless it draws by popularity (zipf)")
        lo, hi = POPULARITY_BANDS[difficulty - 1]
        entity = entities[rng.randrange(lo, hi)]
    attr = rng.choice(ATTRIBUTES)
    templates = HELDOUT_TEMPLATES[attr] if heldout else FACT_TEMPLATES[attr]
    prompt = rng.choice(templates).format(e=entity.name)
    return Task("facts", popularity_band(entity.rank), attr, prompt, entity.attribute(attr),
                heldout=heldout)


# -- drawing prompts ---------------------------------------------------------------------------


def sample(domain: str, rng: random.Random, difficulty: int | None = None, *, zipf: bool = False,
           heldout: bool = False) -> Task:
    """One task of `domain`; difficulty uniform when not given (facts with `zipf`: by popularity);
    `heldout` phrases it with a held-out template."""
    if domain == "facts":
        if zipf:
            return make_fact(rng, zipf=True, heldout=heldout)
        return make_fact(rng, difficulty or rng.choice(DIFFICULTIES), heldout=heldout)
    maker = {"arith": make_arith, "text": make_text}.get(domain)
    if maker is None:
        raise ValueError(f"unknown domain {domain!r}; domains: {DOMAINS}")
    return maker(rng, difficulty or rng.choice(DIFFICULTIES), heldout=heldout)


def _seed(*parts) -> int:
    return int(_digest("/".join(map(str, parts)))[:16], 16)


def generate(split: str, n: int, *, seed: int = 0, domains: Sequence[str] = DOMAINS) -> list[Task]:
    """`n` distinct tasks of `split`, balanced: cycling over domains, then difficulties.

    The list for a given (split, seed, domains) is fixed, and its first k items are the list for
    n = k, so `--limit` takes a stable slice. `heldout` draws every prompt from the held-out
    phrasing family (its content, numbers, words and countries, as in the other splits).
    """
    if split not in EVAL_SPLITS:
        raise ValueError(f"unknown split {split!r}; splits: {list(EVAL_SPLITS)}")
    heldout = split == HELDOUT
    rngs = {d: random.Random(_seed("eval", split, seed, d)) for d in domains}
    seen: set[str] = set()
    out: list[Task] = []
    for i in range(n):
        domain = domains[i % len(domains)]
        difficulty = DIFFICULTIES[(i // len(domains)) % len(DIFFICULTIES)]
        for _ in range(100_000):
            task = sample(domain, rngs[domain], difficulty, heldout=heldout)
            if task.prompt not in seen and task.split == split:
                break
        else:  # the head of the facts world holds ~200 prompts per split and difficulty
            raise ValueError(
                f"the {split} split has no more {domain} prompts of difficulty {difficulty} "
                f"(asked for {n} tasks); ask for fewer"
            )
        seen.add(task.prompt)
        out.append(task)
    return out


def training_stream(domains: Sequence[str] = DOMAINS, *, seed: int = 0) -> Iterator[Task]:
    """An endless stream of `train` tasks: domains in turn, difficulties uniform, facts by
    popularity (Zipf). Repeats are allowed (facts must repeat to be learnt)."""
    rng = random.Random(_seed("train", seed, *domains))
    i = 0
    while True:
        domain = domains[i % len(domains)]
        i += 1
        while True:
            task = sample(domain, rng, zipf=True)
            if task.split == "train":
                yield task
                break
