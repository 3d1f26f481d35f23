"""A small closed synthetic world for training the small model on a 2-core CPU.

    from omnitalk.train.world import make_world
    info = make_world("data/world", n_train=4000, n_eval=400, seed=0)   # espeak-ng voices

What it contains (all English, lowercase, no punctuation; numbers are spelled out):

- arithmetic:  "what is three plus four" -> "seven"   (plus / minus / times, results 0..20)
- counting:    "how many circles are in the picture" -> "three"   (a Pillow drawing, 1..6 of that shape
               among other shapes)
- colours:     "what color is the square" -> "blue"
- shapes:      "what shape is the red one" -> "triangle"
- sentences:   "the red circle is above the blue star", "four plus three is seven", ... (ASR / TTS)

Record kind `cmd` (not in the default mix): ASR of the stop command "stop omni" and its near misses
("stop it", "hey omni", ...), so that a model's own ASR can write the command and `omnitalk serve` can
listen for it with that ASR (stop_detector: asr). Their words join the vocabulary only when the mix has
`cmd` records.

With `answer_prefix` (e.g. ANSWER_PREFIX, "the answer is") every answer to a question (tasks qa and
text) is a short phrase: "the answer is seven". A one-word spoken answer gives a listener (and a
recogniser) no context; the phrase does (docs/demo-model.md).

Records (docs/data-format.md): asr (user speech -> text), qa speech->text, qa speech->speech,
qa image+speech->speech, qa image+speech->text, qa image+text->text, text->text (task 'text'), and tts
(text -> the model's speech). Questions are spoken by varied voice settings (VoiceSpace: espeak-ng
variants x speeds x pitches); answers by ONE fixed voice, the model's voice.

Splits: every sentence is train or held-out by a seeded hash of its text (the same sentence never
appears in both, whatever the task), and the eval manifest uses held-out sentences spoken with held-out
voice settings (VoiceSpace.split). Held-out arithmetic questions are new phrasings of facts that a
training phrasing teaches ("how much is three plus four" when "what is three plus four" is trained).
Images are always drawn fresh. A word-level tokenizer over the world's vocabulary is saved as
tokenizer.json (ids 0..V-1; the small model's text_vocab_size must be >= V + 64 for the special tokens).

Files under out_dir: train.jsonl, eval.jsonl, [interrupt_train.jsonl, interrupt_eval.jsonl],
tokenizer.json, world.json (what was made, with which voices and seed), audio/q/*.wav (16 kHz questions),
audio/a/*.wav (24 kHz answers), images/*.png, interrupt/*.wav. Deterministic for a given seed and synth.
`make_pictures` adds pictures.jsonl: many more written picture questions on distinct scenes (no synthesis).
"""
from __future__ import annotations

import hashlib
import json
import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence


from omnitalk.eval.normalize import UNITS
from omnitalk.train.data import encode_audio_file, make_record, write_manifest
from omnitalk.train.tts import MODEL_VOICE_ESPEAK, MODEL_VOICE_PIPER, Synth, VoiceParams, VoiceSpace, synth_to

NUMBERS = list(UNITS) + ["twenty"]  # zero .. twenty
SHAPES = ("circle", "square", "triangle", "star")
COLORS = {"red": (215, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 215), "yellow": (230, 195, 25),
          "purple": (135, 55, 170), "orange": (240, 135, 25)}
RELATIONS = ("next to", "above", "below", "left of", "right of")
ANSWER_PREFIX = "the answer is"   # the demo's answers: "the answer is seven" (make_world's answer_prefix)

QUESTION_SR = 16000
ANSWER_SR = 24000

# task kinds -> (task, question modalities, speak); the default mixture of a world manifest
KINDS = {
    "asr": ("asr", "audio", False),
    "cmd": ("asr", "audio", False),   # the stop command and its near misses (not in DEFAULT_MIX)
    "a2t": ("qa", "audio", False),
    "a2a": ("qa", "audio", True),
    "ia2a": ("qa", "image+audio", True),
    "ia2t": ("qa", "image+audio", False),
    "it2t": ("qa", "image+text", False),
    "t2t": ("text", "text", False),
    "tts": ("tts", "text", True),
}
DEFAULT_MIX = {"asr": 0.25, "a2t": 0.12, "a2a": 0.15, "ia2a": 0.15, "ia2t": 0.08, "it2t": 0.05, "t2t": 0.10,
               "tts": 0.10}


# ---------------------------------------------------------------------------------------------
# sentences
# ---------------------------------------------------------------------------------------------

def plural(shape: str) -> str:
    return shape + "s"


# Several phrasings per question: a held-out question is a new phrasing of something the training side
# asks in other words, so the phrasings must be many enough that the model learns the fact, not the
# sentence (with three per operation it learnt sentences: docs/training.md, Results).
PLUS = ("what is {a} plus {b}", "how much is {a} plus {b}", "add {a} and {b}", "what is the sum of {a} and {b}",
        "tell me {a} plus {b}", "what do you get for {a} plus {b}", "compute {a} plus {b}", "{a} plus {b} is what")
MINUS = ("what is {a} minus {b}", "how much is {a} minus {b}", "take {b} from {a}", "subtract {b} from {a}",
         "tell me {a} minus {b}", "what do you get for {a} minus {b}", "compute {a} minus {b}",
         "{a} minus {b} is what")
TIMES = ("what is {a} times {b}", "how much is {a} times {b}", "multiply {a} by {b}", "tell me {a} times {b}",
         "what do you get for {a} times {b}", "compute {a} times {b}", "{a} times {b} is what")
COUNT = ("how many {s} are in the picture", "how many {s} can you see", "count the {s}", "how many {s} are there",
         "how many {s} do you see", "tell me how many {s} there are", "what is the number of {s}")
COLOR = ("what color is the {s}", "which color is the {s}", "what color does the {s} have",
         "tell me the color of the {s}", "what is the color of the {s}", "the {s} is what color")
SHAPE = ("what shape is the {c} one", "which shape is {c}", "what is the {c} shape", "tell me the {c} shape",
         "which shape has the color {c}", "the {c} one is what shape")


def arithmetic_facts() -> list[tuple[str, str, str]]:
    """(question, answer, fact) for plus / minus / times with results 0..20; `fact` names the sum
    ("3+4") that the question's phrasings share."""
    out = []
    for a in range(11):
        for b in range(11):
            A, B = NUMBERS[a], NUMBERS[b]
            out += [(t.format(a=A, b=B), NUMBERS[a + b], f"{a}+{b}") for t in PLUS]
            if a >= b:
                out += [(t.format(a=A, b=B), NUMBERS[a - b], f"{a}-{b}") for t in MINUS]
            if a <= 5 and b <= 4 and a * b <= 20:
                out += [(t.format(a=A, b=B), NUMBERS[a * b], f"{a}*{b}") for t in TIMES]
    return out


def arithmetic_questions() -> list[tuple[str, str]]:
    """(question, answer) for plus / minus / times with results 0..20."""
    return [(q, a) for q, a, _ in arithmetic_facts()]


def count_templates() -> list[tuple[str, str]]:
    """(question, shape) for counting questions; the answer depends on the drawn image."""
    return [(t.format(s=plural(s)), s) for s in SHAPES for t in COUNT]


def color_templates() -> list[tuple[str, str]]:
    return [(t.format(s=s), s) for s in SHAPES for t in COLOR]


def shape_templates() -> list[tuple[str, str]]:
    return [(t.format(c=c), c) for c in COLORS for t in SHAPE]


def statement_sentences() -> list[str]:
    """Plain sentences for ASR and TTS (the question sentences are added to these)."""
    out = []
    for c1 in COLORS:
        for s1 in SHAPES:
            for rel in RELATIONS:
                for c2 in COLORS:
                    for s2 in SHAPES:
                        if (c1, s1) != (c2, s2):
                            out.append(f"the {c1} {s1} is {rel} the {c2} {s2}")
    for n in range(1, 7):
        for c in COLORS:
            for s in SHAPES:
                out.append(f"there is one {c} {s} in the picture" if n == 1 else
                           f"there are {NUMBERS[n]} {c} {plural(s)} in the picture")
        for s in SHAPES:
            out.append(f"i can see {NUMBERS[n]} {s if n == 1 else plural(s)}")
    for a in range(11):
        for b in range(11):
            out.append(f"{NUMBERS[a]} plus {NUMBERS[b]} is {NUMBERS[a + b]}")
            if a >= b:
                out.append(f"{NUMBERS[a]} minus {NUMBERS[b]} is {NUMBERS[a - b]}")
    return out


def answer_words() -> list[str]:
    """Every answer a question of the world can have: the numbers, the colours and the shapes."""
    return list(dict.fromkeys(NUMBERS + list(COLORS) + list(SHAPES)))


def with_prefix(answer: str, prefix: str = "") -> str:
    """The answer as the world says it: "seven", or with a prefix "the answer is seven"."""
    prefix = " ".join(prefix.split())
    return f"{prefix} {answer}" if prefix else answer


def command_sentences(interrupt_config=None) -> tuple[list[str], list[str]]:
    """(commands, near misses) for `cmd` records: an InterruptConfig's phrases and confusers (default:
    "stop omni" and train.interrupt.DEFAULT_CONFUSERS)."""
    from omnitalk.train.interrupt import InterruptConfig

    cfg = interrupt_config or InterruptConfig()
    return list(cfg.phrases), list(cfg.confusers)


def world_words(answer_prefix: str = "", commands: bool = False, interrupt_config=None) -> list[str]:
    words = set(answer_prefix.lower().split())
    if commands:
        for s in sum(command_sentences(interrupt_config), []):
            words.update(s.lower().split())
    for q, _ in arithmetic_questions() + count_templates() + color_templates() + shape_templates():
        words.update(q.split())
    for s in statement_sentences():
        words.update(s.split())
    words.update(NUMBERS)
    words.update(SHAPES)
    words.update(COLORS)
    return sorted(words)


def held_out(text: str, seed: int, fraction: float) -> bool:
    """The seeded hash split of sentences: True for about `fraction` of all texts."""
    h = hashlib.sha256(f"{seed}:{text}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64 < fraction


def split_pool(items: list, key, seed: int, fraction: float) -> tuple[list, list]:
    """(train, held_out) by the hash of key(item); each side gets at least one item."""
    tr = [x for x in items if not held_out(key(x), seed, fraction)]
    ho = [x for x in items if held_out(key(x), seed, fraction)]
    if not ho and len(tr) > 1:
        ho.append(tr.pop(min(range(len(tr)), key=lambda i: hashlib.sha256(f"{seed}:{key(tr[i])}".encode()).digest())))
    if not tr and len(ho) > 1:
        tr.append(ho.pop())
    return tr, ho


# ---------------------------------------------------------------------------------------------
# images
# ---------------------------------------------------------------------------------------------

@dataclass
class Scene:
    """What an image shows: a list of (shape, color) with their places."""
    items: list = field(default_factory=list)  # [(shape, color, cx, cy, r)]

    def count(self, shape: str) -> int:
        return sum(1 for s, *_ in self.items if s == shape)


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "square":
        a0 = math.pi / 4 + angle
        pts = [(cx + r * math.cos(a0 + math.pi * i / 2), cy + r * math.sin(a0 + math.pi * i / 2)) for i in range(4)]
    elif shape == "triangle":
        pts = [(cx + r * math.cos(-math.pi / 2 + angle + 2 * math.pi * i / 3),
                cy + r * math.sin(-math.pi / 2 + angle + 2 * math.pi * i / 3)) for i in range(3)]
    elif shape == "star":
        pts = []
        for i in range(10):
            rr = r if i % 2 == 0 else r * 0.45
            a = -math.pi / 2 + angle + math.pi * i / 5
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
    else:
        raise ValueError(shape)
    return pts


def draw_scene(scene: Scene, size: int, rng: random.Random, label_map=None):
    """Pillow drawing of a scene on a light background. With `label_map` (a PIL "L" image of the same
    size) each item i is also drawn there, with the same geometry, in value i + 1."""
    from PIL import Image, ImageDraw

    bg = tuple(rng.randint(225, 255) for _ in range(3))
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    dl = ImageDraw.Draw(label_map) if label_map is not None else None
    for i, (shape, color, cx, cy, r) in enumerate(scene.items):
        rgb = tuple(max(0, min(255, c + rng.randint(-20, 20))) for c in COLORS[color])
        if shape == "circle":
            d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=rgb)
            if dl is not None:
                dl.ellipse([cx - r, cy - r, cx + r, cy + r], fill=i + 1)
        else:
            angle = rng.uniform(-0.25, 0.25) if shape != "star" else rng.uniform(-0.3, 0.3)
            d.polygon(_polygon(shape, cx, cy, r, angle), fill=rgb)
            if dl is not None:
                dl.polygon(_polygon(shape, cx, cy, r, angle), fill=i + 1)
    return img


IMAGE_LAYOUTS = ("free", "grid")
GRID_CELLS = 7  # ViT-B/32 cuts a 224-px image into 7 x 7 patches of 32 px


def check_image_layout(image_layout: str) -> None:
    """Refuse an unknown `image_layout` before any picture is drawn (make_world, make_pictures)."""
    if image_layout not in IMAGE_LAYOUTS:
        raise ValueError(f"image_layout must be one of {IMAGE_LAYOUTS}, got {image_layout!r}")


def place(scene: Scene, shapes: Sequence[tuple[str, str]], size: int, rng: random.Random, layout: str = "free",
          cells: int = GRID_CELLS) -> Scene:
    """Put shapes on the scene without overlap. `free`: anywhere, radius 12..28 px at 224 (a shape spans
    up to four patches of ViT-B/32). `grid`: each shape inside its own cell of a `cells` x `cells` grid
    (the vision tower's patch grid), radius 9..14 px at 224, jittered within its cell, so that every
    patch shows at most one whole shape (docs/training.md: a narrow tower learns this scene in minutes,
    the free one hardly)."""
    scale = size / 224
    if layout == "grid":
        if len(shapes) > cells * cells:
            raise ValueError(f"{len(shapes)} shapes do not fit a {cells} x {cells} grid")
        cell = size / cells
        for (shape, color), k in zip(shapes, rng.sample(range(cells * cells), len(shapes))):
            r = rng.uniform(9, 14) * scale
            j = max(0.0, cell / 2 - r - 1)
            cx, cy = (k % cells + 0.5) * cell + rng.uniform(-j, j), (k // cells + 0.5) * cell + rng.uniform(-j, j)
            scene.items.append((shape, color, cx, cy, r))
        return scene
    if layout != "free":
        raise ValueError(f"image layout must be one of {IMAGE_LAYOUTS}, got {layout!r}")
    for shape, color in shapes:
        for _ in range(500):
            r = rng.uniform(12, 28) * scale
            cx, cy = rng.uniform(r + 2, size - r - 2), rng.uniform(r + 2, size - r - 2)
            if all((cx - x) ** 2 + (cy - y) ** 2 > (r + rr + 4) ** 2 for _, _, x, y, rr in scene.items):
                scene.items.append((shape, color, cx, cy, r))
                break
        else:
            raise RuntimeError("could not place the shapes without overlap; use a larger image")
    return scene


def image_question(family: str, key: str, question: str, size: int, rng: random.Random, layout: str = "free"):
    """Draw an image for an image question -> (image, answer); `layout` as `place`'s."""
    scene, answer = question_scene(family, key, size, rng, layout)
    return draw_scene(scene, size, rng), answer


def question_scene(family: str, key: str, size: int, rng: random.Random, layout: str = "free") -> tuple[Scene, str]:
    """The scene of an image question (family count / color / shape about `key`) and its answer, before
    drawing: count -> 1..6 of `key` among 0..3 others; color -> `key` once, in a colour no other shape has;
    shape -> the one shape of colour `key`."""
    others = lambda s: [x for x in SHAPES if x != s]
    if family == "count":
        n = rng.randint(1, 6)
        shapes = [(key, rng.choice(list(COLORS))) for _ in range(n)]
        shapes += [(rng.choice(others(key)), rng.choice(list(COLORS))) for _ in range(rng.randint(0, 3))]
        answer = NUMBERS[n]
    elif family == "color":
        color = rng.choice(list(COLORS))
        shapes = [(key, color)]
        for s in rng.sample(others(key), rng.randint(0, 2)):
            shapes.append((s, rng.choice([c for c in COLORS if c != color])))
        answer = color
    elif family == "shape":
        shape = rng.choice(SHAPES)
        shapes = [(shape, key)]
        for s in rng.sample(others(shape), rng.randint(0, 2)):
            shapes.append((s, rng.choice([c for c in COLORS if c != key])))
        answer = shape
    else:
        raise ValueError(family)
    rng.shuffle(shapes)
    return place(Scene(), shapes, size, rng, layout), answer


# ---------------------------------------------------------------------------------------------
# tokenizer
# ---------------------------------------------------------------------------------------------

def text_vocab_size(n_words: int) -> int:
    """The small model's `text_vocab_size` for a tokenizer of `n_words` ids: those, then the 64 text
    specials, rounded up to a multiple of 64."""
    return 64 * -(-(n_words + 64) // 64)


def build_tokenizer(words: Sequence[str], path=None):
    """A word-level `tokenizers` Tokenizer: '<unk>' = 0, then the words in sorted order; lowercase,
    split on whitespace and punctuation; decoding joins words with spaces. Saved to `path` if given."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    vocab = {"<unk>": 0}
    for w in sorted(set(words)):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tok.save(str(path))
    return tok


# ---------------------------------------------------------------------------------------------
# the world
# ---------------------------------------------------------------------------------------------

@dataclass
class WorldInfo:
    out_dir: Path
    train_manifest: Path
    eval_manifest: Path
    tokenizer: Path
    vocab_size: int
    counts: dict
    interrupt_train: Path | None = None
    interrupt_eval: Path | None = None

    def to_dict(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}


def _slug(text: str) -> str:
    s = re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:60]
    return f"{s}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"


def _allocate(n: int, mix: dict) -> dict:
    """Largest-remainder split of n records over the mixture weights."""
    total = sum(mix.values())
    raw = {k: n * w / total for k, w in mix.items()}
    counts = {k: int(v) for k, v in raw.items()}
    for k in sorted(raw, key=lambda k: (-(raw[k] - counts[k]), k))[: n - sum(counts.values())]:
        counts[k] += 1
    return counts


class _Pools:
    """The sentences of one split."""

    def __init__(self, seed: int, fraction: float, held: bool):
        pick = lambda items, key: split_pool(items, key, seed, fraction)[1 if held else 0]
        # arithmetic: held-out *phrasings* of facts that some training phrasing teaches (a fact whose
        # every phrasing fell on the held-out side is in neither split: a closed world's facts must be
        # learnt before they can be asked in new words)
        train_arith, held_arith = split_pool(arithmetic_facts(), lambda x: x[0], seed, fraction)
        known = {f for _, _, f in train_arith}
        self.arith = [(q, a) for q, a, f in (held_arith if held else train_arith) if f in known]
        self.image = [("count", k, q) for q, k in pick(count_templates(), lambda x: x[0])] + \
                     [("color", k, q) for q, k in pick(color_templates(), lambda x: x[0])] + \
                     [("shape", k, q) for q, k in pick(shape_templates(), lambda x: x[0])]
        all_q = [q for q, _ in arithmetic_questions()] + [q for q, _ in count_templates() + color_templates() +
                                                            shape_templates()]
        self.sentences = pick(statement_sentences() + all_q, lambda x: x)
        self.tts = pick(statement_sentences() + sorted(set(NUMBERS) | set(SHAPES) | set(COLORS)), lambda x: x)


def world_sentences(seed: int = 0, fraction: float = 0.15) -> tuple[list[str], list[str]]:
    """(training, held-out) texts of the world's split: every sentence and question (ASR) and every
    answer text (TTS) of each side, without duplicates, in a fixed order."""
    sides = []
    for held in (False, True):
        p = _Pools(seed, fraction, held)
        texts = p.sentences + p.tts + [q for q, _ in p.arith] + [q for _, _, q in p.image]
        sides.append(list(dict.fromkeys(texts)))
    return sides[0], sides[1]


def make_world(out_dir, n_train: int, n_eval: int, synth: Synth | None = None, seed: int = 0, *,
               answer_synth: Synth | None = None, answer_voice: VoiceParams | None = None,
               voices: VoiceSpace | None = None, held_out_fraction: float = 0.15, mix: dict | None = None,
               image_size: int = 224, codec=None, n_interrupt_train: int = 0, n_interrupt_eval: int = 0,
               interrupt_config=None, speak_written: bool = False, answer_prefix: str = "",
               image_layout: str = "free", eval_mix: dict | None = None, progress: bool = True) -> WorldInfo:
    """Generate the world (see the module docstring). `synth` speaks the questions (default: espeak-ng),
    `answer_synth` + `answer_voice` the answers (default: the same synth, its MODEL_VOICE). With a `codec`
    the answers' SNAC frames (and interrupt clips' frames) are filled in; otherwise run
    `omnitalk data prepare` on the manifests. With `speak_written`, every written training question
    (t2t) is also asked aloud by a training voice: an a2t record '<id>-sp' after the others (written
    questions teach the facts, their spoken copies teach hearing them; docs/training.md). With
    `answer_prefix` every answer to a question is that phrase + the answer ("the answer is seven").
    `image_layout`: where the pictures' shapes go (`place`: free, or one per cell of the ViT/32 grid).
    `eval_mix`: the held-out split's mixture when it differs from the training one (default: `mix`).
    Slow part: ~20-100 ms of synthesis per record."""
    import soundfile as sf
    from tqdm.auto import tqdm

    from omnitalk.train.tts import EspeakSynth, PiperSynth

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    synth = synth or EspeakSynth()
    answer_synth = answer_synth or synth
    if answer_voice is None:
        answer_voice = MODEL_VOICE_PIPER if isinstance(answer_synth, PiperSynth) else MODEL_VOICE_ESPEAK
    if voices is None:
        voices = VoiceSpace.piper() if isinstance(synth, PiperSynth) else VoiceSpace.espeak()
    train_voices, eval_voices = voices.split()
    mix = dict(mix or DEFAULT_MIX)
    eval_mix = dict(eval_mix or mix)
    unknown = (set(mix) | set(eval_mix)) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown record kinds {sorted(unknown)}; use {sorted(KINDS)}")
    for sub in ("audio/q", "audio/a", "images"):
        (out / sub).mkdir(parents=True, exist_ok=True)

    check_image_layout(image_layout)
    if answer_prefix and not re.fullmatch(r"[a-z ]+", answer_prefix.strip()):
        raise ValueError(f"answer_prefix must be lowercase words (the world's tokenizer is word-level), "
                         f"got {answer_prefix!r}")
    words = world_words(answer_prefix, commands=bool(mix.get("cmd") or eval_mix.get("cmd")),
                        interrupt_config=interrupt_config)
    commands, near_misses = command_sentences(interrupt_config)
    tok_path = out / "tokenizer.json"
    tok = build_tokenizer(words, tok_path)

    answer_cache: dict[str, tuple[str, list | None]] = {}

    def answer_audio(text: str) -> tuple[str, list | None]:
        if text not in answer_cache:
            path = out / "audio/a" / f"{_slug(text)}.wav"
            x = synth_to(answer_synth, text, answer_voice, ANSWER_SR)
            sf.write(str(path), x, ANSWER_SR, subtype="PCM_16")
            frames = encode_audio_file(path, codec).tolist() if codec is not None else None
            answer_cache[text] = (str(path.resolve()), frames)
        return answer_cache[text]

    counts: dict = {}
    manifests = {}
    for split, n, space, held in (("train", n_train, train_voices, False), ("eval", n_eval, eval_voices, True)):
        rng = random.Random(f"{seed}:{split}")
        pools = _Pools(seed, held_out_fraction, held)
        alloc = _allocate(n, eval_mix if held else mix)
        kinds = [k for k in KINDS if k in alloc for _ in range(alloc[k])]
        rng.shuffle(kinds)
        counts[split] = alloc
        records = []
        for i, kind in enumerate(tqdm(kinds, desc=f"world {split}", unit="record", disable=not progress)):
            task, modality, speak = KINDS[kind]
            rid = f"{split}-{i:06d}-{kind}"
            rec_rng = random.Random(f"{seed}:{split}:{i}")
            meta: dict = {"kind": kind, "split": split}
            fields: dict = {"speak": speak}
            if kind == "asr":
                text = rec_rng.choice(pools.sentences)
                question, answer, image = text, text, None
            elif kind == "cmd":  # half the command itself, half a near miss; every split (voices are held out)
                text = rec_rng.choice(commands if rec_rng.random() < 0.5 else near_misses)
                question, answer, image = text, text, None
            elif kind in ("a2t", "a2a", "t2t"):
                question, answer = rec_rng.choice(pools.arith)
                image = None
            elif kind in ("ia2a", "ia2t", "it2t"):
                family, key, question = rec_rng.choice(pools.image)
                image, answer = image_question(family, key, question, image_size, rec_rng, image_layout)
                meta["family"] = family
            elif kind == "tts":
                question = answer = rec_rng.choice(pools.tts)
                image = None
            else:
                raise AssertionError(kind)
            if "image" in modality:
                ipath = out / "images" / f"{rid}.png"
                image.save(ipath, format="PNG")
                fields["question_image"] = str(ipath.resolve())
            if "audio" in modality:
                voice = space.sample(rec_rng)
                x = synth_to(synth, question, voice, QUESTION_SR, peak=rec_rng.uniform(0.4, 0.9))
                qpath = out / "audio/q" / f"{rid}.wav"
                sf.write(str(qpath), x, QUESTION_SR, subtype="PCM_16")
                fields["question_audio"] = str(qpath.resolve())
                meta["voice"] = voice.name
                meta["question_transcript"] = question
            else:
                fields["question_text"] = question
            if task in ("qa", "text"):
                answer = with_prefix(answer, answer_prefix)
            fields["answer_text"] = answer
            if speak:
                fields["answer_audio"], fields["answer_snac"] = answer_audio(answer)
            records.append(make_record(rid, task, **fields, **meta))
        if speak_written and not held:
            copies = [spoken_copy(r, synth, space, out / "audio/q") for r in records if r["kind"] == "t2t"]
            records += copies
            counts[split] = {**alloc, "spoken_copies": len(copies)}
        manifests[split] = write_manifest(records, out / f"{split}.jsonl")

    info = WorldInfo(out, manifests["train"], manifests["eval"], tok_path, tok.get_vocab_size(), counts)
    if n_interrupt_train or n_interrupt_eval:
        from omnitalk.train.interrupt import InterruptConfig, build_interrupt_set

        icfg = interrupt_config or InterruptConfig()
        for split, n, space, held in (("train", n_interrupt_train, train_voices, False),
                                      ("eval", n_interrupt_eval, eval_voices, True)):
            if not n:
                continue
            sentences = _Pools(seed, held_out_fraction, held).sentences
            recs = build_interrupt_set(out, n, synth, space, sentences, codec=codec, config=icfg,
                                       seed=hash_seed(seed, f"interrupt:{split}"), prefix=f"irq-{split}",
                                       progress=progress)
            path = write_manifest(recs, out / f"interrupt_{split}.jsonl")
            setattr(info, f"interrupt_{split}", path)
            counts[f"interrupt_{split}"] = {"positive": sum(1 for r in recs if r["command"]),
                                            "negative": sum(1 for r in recs if not r["command"])}
    meta = {
        "seed": seed, "n_train": n_train, "n_eval": n_eval, "held_out_fraction": held_out_fraction,
        "speak_written": speak_written, "answer_prefix": " ".join(answer_prefix.split()),
        "mix": mix, "eval_mix": eval_mix, "counts": counts, "vocab_size": tok.get_vocab_size(),
        "min_text_vocab_size": tok.get_vocab_size() + 64,
        "synth": type(synth).__name__, "answer_synth": type(answer_synth).__name__,
        "answer_voice": answer_voice.to_dict(),
        "voices": {"train": train_voices.to_dict(), "held_out": eval_voices.to_dict()},
        "image_size": image_size, "image_layout": image_layout,
        "question_sample_rate": QUESTION_SR, "answer_sample_rate": ANSWER_SR,
        "snac_filled": codec is not None,
        "files": {k: (str(Path(v).relative_to(out.resolve())) if v else None) for k, v in
                  (("train", info.train_manifest.resolve()), ("eval", info.eval_manifest.resolve()),
                   ("tokenizer", tok_path.resolve()),
                   ("interrupt_train", info.interrupt_train and info.interrupt_train.resolve()),
                   ("interrupt_eval", info.interrupt_eval and info.interrupt_eval.resolve()))},
    }
    (out / "world.json").write_text(json.dumps(meta, indent=2) + "\n")
    return info


def spoken_recordings(manifest) -> dict[str, list[str]]:
    """{question text: [audio paths]}: the recordings of a world's spoken picture questions (kinds ia2t,
    ia2a) in `manifest` (a world's train.jsonl), by what they say; paths absolute."""
    from omnitalk.train.data import read_manifest

    out: dict[str, list[str]] = {}
    for r in read_manifest(manifest):
        if r.get("kind") in ("ia2t", "ia2a") and r.get("question_audio") and r.get("question_transcript"):
            out.setdefault(r["question_transcript"], []).append(str(Path(r["question_audio"]).resolve()))
    return {k: sorted(set(v)) for k, v in out.items()}


def make_pictures(out_dir, n: int, seed: int = 0, *, held_out_fraction: float = 0.15, image_size: int = 224,
                  image_layout: str = "free", answer_prefix: str = "", families: Sequence[str] | None = None,
                  spoken: float = 0.0, recordings: dict[str, list[str]] | None = None,
                  progress: bool = True) -> Path:
    """`n` more written picture questions (kind it2t) for the training side of the world in `out_dir`:
    the training phrasings, each on a freshly drawn scene, in `<out_dir>/pictures.jsonl` (ids
    `pic-NNNNNN-it2t`, images in `images/`). A picture costs milliseconds and no synthesis, so a world can
    have many more distinct scenes than spoken records; the world's own records stay as they were (a
    separate manifest, seeded apart from them), so a stage 0 trained on the world still applies.
    `families`: the picture families to ask (default: count, color and shape). `spoken`: the share of the
    pictures whose question is asked aloud instead (kind ia2t, ids `pic-NNNNNN-ia2t`) with one of the
    world's own `recordings` of the same phrasing (`spoken_recordings`; no synthesis): the scenes stay the
    draw they are without it."""
    from tqdm.auto import tqdm

    check_image_layout(image_layout)
    if not 0.0 <= spoken <= 1.0:
        raise ValueError(f"spoken is a share of the pictures in [0, 1], got {spoken!r}")
    if spoken and not recordings:
        raise ValueError("spoken pictures need the world's recordings of its picture questions (spoken_recordings "
                         "of its train.jsonl); this world has none")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    pool = _Pools(seed, held_out_fraction, held=False).image
    if families is not None:
        unknown = set(families) - {"count", "color", "shape"}
        if unknown or not families:
            raise ValueError(f"families must be some of count, color, shape; got {sorted(families)}")
        pool = [x for x in pool if x[0] in families]
    records = []
    for i in tqdm(range(n), desc="pictures", unit="picture", disable=not progress):
        rid = f"pic-{i:06d}-it2t"
        rng = random.Random(f"{seed}:pictures:{i}")
        family, key, question = rng.choice(pool)
        image, answer = image_question(family, key, question, image_size, rng, image_layout)
        ipath = out / "images" / f"{rid}.png"
        image.save(ipath, format="PNG")
        answer = with_prefix(answer, answer_prefix)
        if spoken and recordings.get(question) and rng.random() < spoken:  # drawn after the scene: it stays
            records.append(make_record(f"pic-{i:06d}-ia2t", "qa", question_audio=rng.choice(recordings[question]),
                                       question_image=str(ipath.resolve()), answer_text=answer, speak=False,
                                       kind="ia2t", split="train", family=family, question_transcript=question))
            continue
        records.append(make_record(rid, "qa", question_text=question, question_image=str(ipath.resolve()),
                                   answer_text=answer, speak=False, kind="it2t", split="train", family=family))
    return write_manifest(records, out / "pictures.jsonl")


def spoken_copy(record: dict, synth: Synth, voices: VoiceSpace, audio_dir: Path) -> dict:
    """The a2t record '<id>-sp' asking a written question (t2t) aloud, in a voice of `voices` drawn by
    the record's id."""
    import soundfile as sf

    rng = random.Random("spoken-aug:" + record["id"])
    voice = voices.sample(rng)
    x = synth_to(synth, record["question_text"], voice, QUESTION_SR, peak=rng.uniform(0.4, 0.9))
    path = Path(audio_dir) / f"{record['id']}-sp.wav"
    sf.write(str(path), x, QUESTION_SR, subtype="PCM_16")
    return make_record(record["id"] + "-sp", "qa", question_audio=str(path.resolve()),
                       answer_text=record["answer_text"], speak=False, kind="a2t", split=record.get("split"),
                       voice=voice.name, question_transcript=record["question_text"])


def hash_seed(seed: int, tag: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{tag}".encode()).digest()[:4], "big")
