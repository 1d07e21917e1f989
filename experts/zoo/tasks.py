"""The task suite: seeded, checkable prompts with exact answers in three domains.

- `arith`: integer `+ - *` with 1 to 5 digit operands, and chains of three operands joined by
  `+` and `-`; difficulty from the digits and the operation.
- `text`: string operations on random words (reverse, sort the letters, count a letter,
  upper-case, last letter, length, count the vowels, drop a letter); difficulty from the word's
  length.
- `facts`: questions about a synthetic world of invented countries (capital, founding year, flag
  colour, national animal, and pairs of two of them). Training data asks about country `r` (its
  popularity rank) with a Zipf-Mandelbrot frequency ~ 1/(r + q), so the head is seen often and
  the tail rarely; difficulty is the popularity band (head, torso, tail).

Every operation is asked in eight to thirteen phrasings (`TEMPLATES`) that differ in word order,
wording and formatting. A prompt's split (`train` / `calib` / `test`) is a function of its text
alone (a hash), so the splits never share a prompt however many are drawn. The `heldout` split
asks the same operations in a family of phrasings (`HELDOUT_TEMPLATES`) that no training,
calibration or test prompt uses, so it measures how the zoo and the router generalise beyond the
templates they saw. Answers are checked by exact match after normalising whitespace. This module
needs only the standard library.
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


# -- templates ---------------------------------------------------------------------------------

# Every operation is asked in many phrasings that differ in word order, wording and formatting.
# `TEMPLATES` is the family that training, calibration and test prompts use; `HELDOUT_TEMPLATES`
# is the held-out family (the `heldout` split): no training, calibration or test prompt uses it.
# Arithmetic fills {a} {b} (two operands) or {x} / {y} (a chain, spaced / compact); text fills
# {w} (the word) and {l} (a letter); facts fill {e} (the country) and, for a pair, {p} {q} (the
# two attributes' names).
TEMPLATES = {
    "add": ("What is {a} + {b}?", "What is {a} plus {b}?", "Calculate {a} + {b}.", "{a} + {b} = ?",
            "Find the sum of {a} and {b}.", "What do you get if you add {a} and {b}?",
            "Work out {a}+{b}", "{a} plus {b} equals what?", "Please compute {a} + {b}.",
            "{a} plus {b}?", "What's the total of {a} and {b}?", "Total of {a} + {b}:"),
    "sub": ("What is {a} - {b}?", "What is {a} minus {b}?", "Calculate {a} - {b}.", "{a} - {b} = ?",
            "What is the difference between {a} and {b}?",
            "What do you get if you subtract {b} from {a}?", "Work out {a}-{b}",
            "{a} minus {b} equals what?", "Please compute {a} - {b}.", "Take {b} away from {a}.",
            "{a} minus {b}?", "What's {a} take away {b}?", "Value of {a} - {b}:"),
    "mul": ("What is {a} * {b}?", "What is {a} times {b}?", "Calculate {a} * {b}.", "{a} * {b} = ?",
            "Find the product of {a} and {b}.", "What do you get if you multiply {a} by {b}?",
            "Work out {a}*{b}", "{a} times {b} equals what?", "Please compute {a} * {b}.",
            "{a} times {b}?", "What's {a} multiplied by {b}?", "Value of {a} * {b}:"),
    "chain": ("What is {x}?", "Calculate {x}.", "{x} = ?", "Work out {y}", "Evaluate {x}.",
              "Please compute {x}.", "Find the value of {x}.", "{x} equals what?",
              "{x}?", "What's {y}?", "Value of {y}:"),
    "reverse": ('Reverse the word "{w}".', 'Reverse "{w}".', 'Write "{w}" backwards.',
                'What is "{w}" spelled backwards?', 'Give the reverse of "{w}".',
                'Reverse the letters of "{w}".', 'Read "{w}" from right to left.',
                'What is the word "{w}" written in reverse?',
                '"{w}" backwards?', 'Reversal of "{w}":', 'What\'s "{w}" in reverse?'),
    "sort": ('Sort the letters of "{w}".', 'Sort "{w}" alphabetically.',
             'Write the letters of "{w}" in alphabetical order.',
             'What are the letters of "{w}" in sorted order?', 'Alphabetize the letters in "{w}".',
             'Order the letters of "{w}" from a to z.', 'Rearrange "{w}" so its letters are sorted.',
             'Give "{w}" with its letters in order.',
             '"{w}" sorted?', 'Sorted letters of "{w}":', 'What\'s "{w}" in alphabetical order?'),
    "count": ('How many times does "{l}" appear in "{w}"?', 'Count how many "{l}" are in "{w}".',
              'How often does the letter "{l}" occur in "{w}"?',
              'In "{w}", how many times is "{l}" used?', 'What is the number of "{l}" in "{w}"?',
              'How many "{l}" letters does "{w}" have?', 'Tally the letter "{l}" in "{w}".',
              'How many occurrences of "{l}" are there in "{w}"?',
              'Occurrences of "{l}" in "{w}":', '"{l}" count in "{w}"?', 'What\'s the count of "{l}" in "{w}"?'),
    "upper": ('Write "{w}" in capital letters.', 'Change "{w}" to uppercase.',
              'What is "{w}" in upper case?', 'Capitalize every letter of "{w}".',
              'Make "{w}" all caps.', 'Write "{w}" in uppercase letters.',
              'Give "{w}" in block capitals.', 'Turn "{w}" into capital letters.',
              '"{w}" uppercased?', 'Capital letters of "{w}":', 'What\'s "{w}" in caps?'),
    "last": ('What is the last letter of "{w}"?', 'Which letter does "{w}" end with?',
             'Give the final letter of "{w}".', 'What letter is at the end of "{w}"?',
             'Name the last letter in "{w}".', 'Which letter is last in "{w}"?',
             'What is the final character of "{w}"?', 'Tell the last letter of "{w}".',
             '"{w}": last letter?', 'What\'s the end letter of "{w}"?', 'Letter at the end of "{w}":'),
    "length": ('How many letters are in "{w}"?', 'How long is the word "{w}"?',
               'How many characters does "{w}" have?', 'Count the characters in "{w}".',
               'What is the number of letters in "{w}"?', 'Give the length of "{w}".',
               'How many letters does the word "{w}" contain?', 'Tell how many letters "{w}" has.',
               '"{w}" letter count?', 'Letter count of "{w}":', 'What\'s the number of characters in "{w}"?'),
    "vowels": ('How many vowels are in "{w}"?', 'Count the vowels in "{w}".',
               'How many vowels does "{w}" have?', 'What is the number of vowels in "{w}"?',
               'In "{w}", how many letters are vowels?', 'Tell how many vowels "{w}" contains.',
               'How many of the letters of "{w}" are vowels?', 'Give the vowel count of "{w}".',
               '"{w}" vowel count?', 'Vowel count of "{w}":', 'What\'s the number of vowels in "{w}"?'),
    "drop": ('Remove every "{l}" from "{w}".', 'Delete the letter "{l}" from "{w}".',
             'Write "{w}" without the letter "{l}".', 'What is "{w}" with all "{l}" removed?',
             'Take out each "{l}" in "{w}".', 'Drop the letter "{l}" from "{w}".',
             'Strip "{l}" from "{w}".', 'Give "{w}" with every "{l}" deleted.',
             '"{w}" with no "{l}"?', 'Letters of "{w}" except "{l}":', 'What\'s "{w}" after removing "{l}"?'),
    "capital": ("What is the capital of {e}?", "Which city is the capital of {e}?",
                "Name the capital city of {e}.", "{e} has its capital in which city?",
                "The capital of {e} is which city?", "Where is the capital of {e}?",
                "What city serves as the capital of {e}?", "I need the capital of {e}."),
    "founded": ("In what year was {e} founded?", "When was {e} founded?",
                "What is the founding year of {e}?", "{e} was founded in which year?",
                "Which year saw the founding of {e}?", "What year was {e} founded in?",
                "In which year did {e} come into being?", "{e} dates its founding to which year?"),
    "colour": ("What colour is the flag of {e}?", "What is the flag colour of {e}?",
               "Which colour is the flag of {e}?", "The flag of {e} is what colour?",
               "{e} has a flag of which colour?", "What is the colour of the flag of {e}?",
               "Which colour does the flag of {e} show?", "Name the colour of the flag of {e}."),
    "animal": ("What is the national animal of {e}?", "Which animal is the symbol of {e}?",
               "Name the national animal of {e}.", "{e} has which national animal?",
               "The national animal of {e} is which?", "What animal represents {e}?",
               "Which is the national animal of {e}?", "What national animal does {e} have?"),
    "pair": ("What are the {p} and the {q} of {e}?", "Name the {p} and the {q} of {e}.",
             "Give the {p} and {q} of {e}.", "What {p} and what {q} does {e} have?",
             "Which {p} and which {q} belong to {e}?", "List the {p} and the {q} of {e}.",
             "State the {p} and the {q} of {e}.", "For {e}, what are the {p} and the {q}?"),
}
HELDOUT_TEMPLATES = {
    "add": ("Compute {a} plus {b}.", "{a}+{b}=?", "Add {a} and {b}.", "Sum of {a} and {b}:"),
    "sub": ("Compute {a} minus {b}.", "{a}-{b}=?", "Subtract {b} from {a}.",
            "Difference of {a} and {b}:"),
    "mul": ("Compute {a} times {b}.", "{a}*{b}=?", "Multiply {a} by {b}.",
            "Product of {a} and {b}:"),
    "chain": ("Compute {x}.", "{y}=?", "Result of {x}:"),
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
    "vowels": ('Number of vowels in "{w}":', '"{w}" has how many vowels?', 'Vowels in "{w}"?'),
    "drop": ('Erase "{l}" from "{w}".', '"{w}" without "{l}":', 'Leave out the "{l}" letters of "{w}".'),
    "capital": ("Tell me the capital of {e}.", "Capital of {e}?", "{e}: capital city?"),
    "founded": ("Tell me when {e} was founded.", "Founding year of {e}?", "{e}: year founded?"),
    "colour": ("Tell me the colour of the flag of {e}.", "Flag colour of {e}?",
               "{e}: colour of its flag?"),
    "animal": ("Tell me the national animal of {e}.", "National animal of {e}?",
               "{e}: national animal?"),
    "pair": ("Tell me the {p} and the {q} of {e}.", "{P} and {q} of {e}?", "{e}: {p} and {q}?"),
}


STYLE_ODDS = 0.25  # chance of each surface variant: lower-case first letter, no final mark


def _phrase(rng: random.Random, kind: str, heldout: bool, **slots) -> str:
    """The prompt: one template of the kind's family in one of its surface variants (first letter
    lower-cased, final punctuation left off). Drawn last, with the same draws for either family,
    so that a held-out and an in-template draw from the same generator state ask the same
    question."""
    family = HELDOUT_TEMPLATES if heldout else TEMPLATES
    template = rng.choice(family[kind])
    lower, bare = rng.random() < STYLE_ODDS, rng.random() < STYLE_ODDS
    text = template.format(**slots)
    if lower and template[0].isalpha():  # never a name: templates opening with {e} keep it
        text = text[0].lower() + text[1:]
    if bare and text[-1] in ".?:":
        text = text[:-1]
    return text


# -- arithmetic --------------------------------------------------------------------------------

ARITH_KINDS = ("add", "sub", "mul", "chain")
# difficulty -> kind -> the (digits of a, digits of b) shapes drawn from uniformly; a chain is
# three operands of the given digits joined by + and -
ARITH_LEVELS = {
    1: {"add": [(1, 1), (1, 2), (2, 1), (2, 2)], "sub": [(1, 1), (1, 2), (2, 1), (2, 2)],
        "mul": [(1, 1)], "chain": [(1, 1)]},
    2: {"add": [(a, b) for a in (3, 4) for b in (1, 2, 3, 4)],
        "sub": [(a, b) for a in (3, 4) for b in (1, 2, 3, 4)],
        "mul": [(2, 1), (1, 2), (2, 2)], "chain": [(2, 2)]},
    3: {"add": [(5, b) for b in (3, 4, 5)], "sub": [(5, b) for b in (3, 4, 5)],
        "mul": [(a, b) for a in (3, 4) for b in (1, 2)], "chain": [(3, 3)]},
}
_OPS = {"add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b}


def _number(rng: random.Random, digits: int) -> int:
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


def make_arith(rng: random.Random, difficulty: int, *, heldout: bool = False) -> Task:
    kind = rng.choice(ARITH_KINDS)
    da, db = rng.choice(ARITH_LEVELS[difficulty][kind])
    if kind == "chain":
        terms = [_number(rng, da) for _ in range(3)]
        ops = [rng.choice("+-") for _ in range(2)]
        value = terms[0]
        for op, t in zip(ops, terms[1:]):
            value = value + t if op == "+" else value - t
        spaced = f"{terms[0]} {ops[0]} {terms[1]} {ops[1]} {terms[2]}"
        prompt = _phrase(rng, kind, heldout, x=spaced, y=spaced.replace(" ", ""))
        return Task("arith", difficulty, kind, prompt, str(value), heldout=heldout)
    a, b = _number(rng, da), _number(rng, db)
    prompt = _phrase(rng, kind, heldout, a=a, b=b)
    return Task("arith", difficulty, kind, prompt, str(_OPS[kind](a, b)), heldout=heldout)


# -- text ------------------------------------------------------------------------------------

TEXT_LENGTHS = {1: (3, 5), 2: (6, 9), 3: (10, 13)}
TEXT_OPS = ("reverse", "sort", "count", "upper", "last", "length", "vowels", "drop")
VOWELS = "aeiou"


def _word(rng: random.Random, difficulty: int) -> str:
    lo, hi = TEXT_LENGTHS[difficulty]
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(lo, hi)))


def make_text(rng: random.Random, difficulty: int, *, heldout: bool = False) -> Task:
    word, op = _word(rng, difficulty), rng.choice(TEXT_OPS)
    letter = ""
    if op == "count":  # mostly a letter of the word, sometimes one it lacks (answer 0)
        letter = rng.choice(word) if rng.random() < 0.7 else rng.choice(string.ascii_lowercase)
    elif op == "drop":  # a letter of the word that is not all of it
        letter = rng.choice(word)
        if set(word) == {letter}:
            word += "a" if letter != "a" else "b"
    answer = {
        "reverse": lambda: word[::-1],
        "sort": lambda: "".join(sorted(word)),
        "count": lambda: str(word.count(letter)),
        "upper": lambda: word.upper(),
        "last": lambda: word[-1],
        "length": lambda: str(len(word)),
        "vowels": lambda: str(sum(c in VOWELS for c in word)),
        "drop": lambda: word.replace(letter, ""),
    }[op]()
    return Task("text", difficulty, op, _phrase(rng, op, heldout, w=word, l=letter), answer,
                heldout=heldout)


# -- facts -----------------------------------------------------------------------------------

COLOURS = ("red", "blue", "green", "yellow", "white", "black", "orange", "purple", "grey", "teal", "pink", "brown")
ANIMALS = ("wolf", "bear", "eagle", "otter", "lynx", "heron", "fox", "owl", "stag", "hare", "seal", "crane")
ATTRIBUTES = ("capital", "founded", "colour", "animal")
FACT_KINDS = (*ATTRIBUTES, "pair")  # a pair asks two attributes at once: "Kraml, 1523"
ATTRIBUTE_NAMES = {"capital": "capital", "founded": "founding year", "colour": "flag colour",
                   "animal": "national animal"}
# A fact asked in the test split with one phrasing is learnt in training from the others: the
# split hashes the whole prompt.
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
    kind = rng.choice(FACT_KINDS)
    if kind == "pair":
        first, second = rng.sample(ATTRIBUTES, 2)
        p, q = ATTRIBUTE_NAMES[first], ATTRIBUTE_NAMES[second]
        prompt = _phrase(rng, kind, heldout, e=entity.name, p=p, q=q, P=p.capitalize())
        answer = f"{entity.attribute(first)}, {entity.attribute(second)}"
    else:
        prompt = _phrase(rng, kind, heldout, e=entity.name)
        answer = entity.attribute(kind)
    return Task("facts", popularity_band(entity.rank), kind, prompt, answer, heldout=heldout)


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
