"""Training data: the JSONL manifest, readers for public corpora, SNAC answer codes, cached encoder features.

One manifest line is one record (docs/data-format.md has the full contract):

    {"id": "va-0001", "task": "qa", "question_text": null, "question_audio": "audio/va-0001.wav",
     "question_image": null, "answer_text": "Paris is the capital.", "answer_snac": [[...7 ints...], ...],
     "answer_audio": null, "speak": true}

Every non-null `question_*` field is an input of the model; a transcript of the question audio (useful
for ASR or for building other records) goes to the extra field `question_transcript`. Extra fields are
kept as they are. Paths in the file are relative to the manifest's folder; `read_manifest` returns them
absolute, `write_manifest` writes them relative again.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

from omnitalk.errors import InputError

TASKS = ("asr", "qa", "text", "tts", "interrupt")
PATH_FIELDS = ("question_audio", "question_image", "answer_audio", "listen_audio")
STRING_FIELDS = ("question_text", "answer_text", "question_transcript")
CODEBOOK_SIZE = 4096
N_LAYERS = 7


class ManifestError(InputError):
    """A manifest line that does not follow the record format."""


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------

def _frames_problem(x, what: str) -> str | None:
    """None if x is a list of [n,7] SNAC frames with codes 0..4095, else a description of the problem."""
    if not isinstance(x, (list, tuple, np.ndarray)):
        return f"expected a list of [n,7] SNAC frames, got {type(x).__name__}"
    try:
        a = np.asarray(x)
    except ValueError:
        return "expected a list of [n,7] SNAC frames; the rows have different lengths"
    if a.size == 0:
        return f"{what} is empty; expected at least one frame of 7 codes"
    if a.ndim != 2 or a.shape[1] != N_LAYERS:
        return f"expected shape [n,7] (7 codes per SNAC frame), got shape {list(a.shape)}"
    if not np.issubdtype(a.dtype, np.integer):
        return f"expected integer codes, got {a.dtype}"
    if a.min() < 0 or a.max() >= CODEBOOK_SIZE:
        f, j = map(int, np.argwhere((a < 0) | (a >= CODEBOOK_SIZE))[0])
        return f"frame {f} layer {j} holds {int(a[f, j])}; codes must be 0..{CODEBOOK_SIZE - 1}"
    return None


def validate_record(rec: dict, where: str = "record", base_dir: str | os.PathLike | None = None,
                    check_files: bool = False) -> dict:
    """Check one record; return it with the optional fields filled (None / speak default).

    Raises ManifestError("<where>: field '<name>': <problem>"). With check_files, paths are resolved
    against base_dir and must exist.
    """
    def fail(field: str, problem: str):
        raise ManifestError(f"{where}: field '{field}': {problem}")

    if not isinstance(rec, dict):
        raise ManifestError(f"{where}: a record must be a JSON object, got {type(rec).__name__}")
    rid = rec.get("id")
    if not isinstance(rid, str) or not rid:
        fail("id", f"required non-empty string, got {rid!r}")
    task = rec.get("task")
    if task not in TASKS:
        fail("task", f"must be one of {', '.join(TASKS)}; got {task!r}")
    out = dict(rec)
    for f in ("question_text", "question_audio", "question_image", "answer_text", "answer_snac", "answer_audio"):
        out.setdefault(f, None)
    out.setdefault("speak", task == "tts")
    if not isinstance(out["speak"], bool):
        fail("speak", f"must be true or false, got {out['speak']!r}")
    for f in STRING_FIELDS + PATH_FIELDS:
        v = out.get(f)
        if v is not None and not isinstance(v, str):
            fail(f, f"must be a string or null, got {type(v).__name__}")
        if f in PATH_FIELDS and v == "":
            fail(f, "empty path; use null when there is no file")
    if check_files:
        for f in PATH_FIELDS:
            v = out.get(f)
            if v is not None:
                p = Path(v) if base_dir is None else Path(base_dir, v)
                if not p.is_file():
                    fail(f, f"file not found: {p}")
    if out["answer_snac"] is not None:
        problem = _frames_problem(out["answer_snac"], "answer_snac")
        if problem:
            fail("answer_snac", problem)
    has_q = [f for f in ("question_text", "question_audio", "question_image") if out[f] is not None]
    has_answer_audio = out["answer_snac"] is not None or out["answer_audio"] is not None

    if task == "asr":
        if out["question_audio"] is None:
            fail("question_audio", "an 'asr' record needs the audio to transcribe")
        if out["answer_text"] is None:
            fail("answer_text", "an 'asr' record needs the transcript")
        if out["question_image"] is not None or out["question_text"] is not None:
            fail("question_image" if out["question_image"] is not None else "question_text",
                 "an 'asr' record takes speech alone (put a transcript of the audio in answer_text)")
        if out["speak"]:
            fail("speak", "an 'asr' record answers in text only (speak must be false)")
    elif task in ("qa", "text"):
        if task == "text" and out["question_text"] is None:
            fail("question_text", "a 'text' record needs a typed question")
        if task == "text" and (out["question_audio"] is not None or out["question_image"] is not None):
            fail("question_audio" if out["question_audio"] is not None else "question_image",
                 "a 'text' record takes typed text alone; use task 'qa' for speech or image questions")
        if not has_q:
            fail("question_text", "a 'qa' record needs at least one of question_text, question_audio, "
                                  "question_image")
        if out["answer_text"] is None:
            fail("answer_text", f"a '{task}' record needs the answer text")
        if out["speak"] and not has_answer_audio:
            fail("answer_snac", "speak is true but there is neither answer_snac nor answer_audio")
    elif task == "tts":
        if out["question_text"] is None:
            fail("question_text", "a 'tts' record needs the text to speak")
        if not has_answer_audio:
            fail("answer_snac", "a 'tts' record needs the speech: answer_snac or answer_audio")
        if not out["speak"]:
            fail("speak", "a 'tts' record speaks (speak must be true)")
        if out["answer_text"] is None:
            out["answer_text"] = out["question_text"]  # the text stream of the answer says the same words
    elif task == "interrupt":
        frames, labels = out.get("listen_frames"), out.get("labels")
        if frames is None and out.get("listen_audio") is None:
            fail("listen_frames", "an 'interrupt' record needs listen_frames (or listen_audio, to be encoded "
                                  "by `omnitalk data prepare`)")
        if frames is not None:
            problem = _frames_problem(frames, "listen_frames")
            if problem:
                fail("listen_frames", problem)
        if not isinstance(labels, list) or not labels:
            fail("labels", "an 'interrupt' record needs per-frame labels: a non-empty list of 0/1")
        if any(x not in (0, 1) or isinstance(x, bool) for x in labels):
            bad = next(x for x in labels if x not in (0, 1) or isinstance(x, bool))
            fail("labels", f"labels must be 0 (n_irq) or 1 (irq), found {bad!r}")
        if any(a > b for a, b in zip(labels, labels[1:])):
            fail("labels", "labels must be 0...0 then 1...1 (irq holds from the frame it starts in)")
        if frames is not None and len(labels) != len(frames):
            fail("labels", f"{len(labels)} labels for {len(frames)} listen_frames; need one per frame")
    return out


# ---------------------------------------------------------------------------------------------
# manifest I/O
# ---------------------------------------------------------------------------------------------

def read_manifest(path: str | os.PathLike, check_files: bool = True, resolve_paths: bool = True) -> list[dict]:
    """Read and validate a JSONL manifest. Paths come back absolute (resolved against the manifest's
    folder) unless resolve_paths=False. Errors name the file, line number and field."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest not found: {path}")
    base = path.resolve().parent
    records, seen = [], {}
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ManifestError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            rec = validate_record(rec, where, base_dir=base, check_files=check_files)
            if rec["id"] in seen:
                raise ManifestError(f"{where}: field 'id': duplicate id {rec['id']!r} "
                                    f"(first on line {seen[rec['id']]})")
            seen[rec["id"]] = lineno
            if resolve_paths:
                for f in PATH_FIELDS:
                    if rec.get(f) is not None:
                        rec[f] = str((base / rec[f]).resolve()) if not os.path.isabs(rec[f]) else rec[f]
            records.append(rec)
    return records


def _plain(x):
    """numpy/torch values -> JSON-serialisable Python values."""
    if isinstance(x, torch.Tensor):
        x = x.cpu().numpy()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    return x


def write_manifest(records: Iterable[dict], path: str | os.PathLike, base_dir: str | os.PathLike | None = None,
                   check_files: bool = False) -> Path:
    """Validate and write records as JSONL. Paths are written relative to the manifest's folder
    (relative input paths are taken relative to `base_dir`, default the current directory)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = path.resolve().parent
    base = Path(base_dir).resolve() if base_dir is not None else Path.cwd()
    seen = set()
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for i, rec in enumerate(records):
            rec = _plain(dict(rec))
            for f in PATH_FIELDS:
                if rec.get(f) is not None:
                    p = Path(rec[f])
                    p = p if p.is_absolute() else base / p
                    rec[f] = Path(os.path.relpath(p.resolve(), folder)).as_posix()
            rec = validate_record(rec, f"record {i} (id {rec.get('id')!r})", base_dir=folder, check_files=check_files)
            if rec["id"] in seen:
                raise ManifestError(f"record {i}: field 'id': duplicate id {rec['id']!r}")
            seen.add(rec["id"])
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path


def make_record(id: str, task: str, **fields) -> dict:
    """A record with every standard field present (None / default speak) plus `fields`."""
    rec = {"id": id, "task": task, "question_text": None, "question_audio": None, "question_image": None,
           "answer_text": None, "answer_snac": None, "answer_audio": None, "speak": task == "tts"}
    rec.update(fields)
    return rec


# ---------------------------------------------------------------------------------------------
# SNAC strings (VoiceAssistant-400K `answer_snac`)
# ---------------------------------------------------------------------------------------------

def parse_snac_string(s: str) -> np.ndarray:
    """VoiceAssistant-400K's `answer_snac` -> frames (n, 7) int64.

    The string is the official code's flattened frame list joined by spaces: each frame is '#'
    followed by its 7 codes in LLM layer order (c0[f], c1[2f], c2[4f], c2[4f+1], c1[2f+1], c2[4f+2],
    c2[4f+3]), e.g. '# 12 845 3009 77 1024 5 4095 # 9 ...'. Whitespace around '#' is optional.
    """
    if not isinstance(s, str):
        raise InputError(f"answer_snac must be a string, got {type(s).__name__}")
    parts = [p.split() for p in s.split("#")]
    if parts and not parts[0]:
        parts = parts[1:]
    elif parts and parts[0]:
        raise InputError(f"answer_snac must start with '#' (frame separator), got {s[:30]!r}")
    frames = []
    for f, p in enumerate(parts):
        if len(p) != N_LAYERS:
            raise InputError(f"answer_snac frame {f} has {len(p)} codes, expected 7: {' '.join(p)[:60]!r}")
        try:
            frames.append([int(x) for x in p])
        except ValueError:
            raise InputError(f"answer_snac frame {f} holds a non-integer code: {' '.join(p)[:60]!r}") from None
    a = np.asarray(frames, dtype=np.int64).reshape(-1, N_LAYERS)
    if a.size and (a.min() < 0 or a.max() >= CODEBOOK_SIZE):
        raise InputError(f"answer_snac holds codes outside 0..{CODEBOOK_SIZE - 1} ({a.min()}..{a.max()})")
    return a


def format_snac_string(frames) -> str:
    """Frames (n, 7) -> the `answer_snac` string format ('# a b c d e f g # ...')."""
    a = np.asarray(frames, dtype=np.int64).reshape(-1, N_LAYERS)
    return " ".join("# " + " ".join(map(str, row)) for row in a)


# ---------------------------------------------------------------------------------------------
# LibriSpeech / LibriTTS
# ---------------------------------------------------------------------------------------------

def read_librispeech(root: str | os.PathLike, lowercase: bool = False, limit: int | None = None) -> list[dict]:
    """LibriSpeech layout (<root>/[<split>/]<speaker>/<chapter>/<speaker>-<chapter>.trans.txt listing
    '<utt-id> TEXT' and <utt-id>.flac beside it) -> 'asr' records with absolute audio paths."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"LibriSpeech folder not found: {root}")
    records = []
    for trans in sorted(root.rglob("*.trans.txt")):
        for lineno, line in enumerate(trans.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            utt, _, text = line.strip().partition(" ")
            audio = next((trans.parent / f"{utt}{ext}" for ext in (".flac", ".wav")
                          if (trans.parent / f"{utt}{ext}").is_file()), None)
            if audio is None:
                raise InputError(f"{trans}:{lineno}: no audio file {utt}.flac beside the transcript")
            speaker, chapter = (utt.split("-") + ["", ""])[:2]
            records.append(make_record(utt, "asr", question_audio=str(audio.resolve()),
                                       answer_text=text.lower() if lowercase else text,
                                       speaker=speaker, chapter=chapter, corpus="librispeech"))
            if limit is not None and len(records) >= limit:
                return records
    if not records:
        raise InputError(f"no LibriSpeech transcripts (*.trans.txt) under {root}")
    return records


def read_libritts(root: str | os.PathLike, lowercase: bool = False, limit: int | None = None) -> list[dict]:
    """LibriTTS layout (<root>/[<split>/]<speaker>/<chapter>/<utt-id>.wav + <utt-id>.normalized.txt)
    -> 'asr' records (the normalized text is the transcript)."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"LibriTTS folder not found: {root}")
    records = []
    for txt in sorted(root.rglob("*.normalized.txt")):
        utt = txt.name[: -len(".normalized.txt")]
        wav = txt.with_name(utt + ".wav")
        if not wav.is_file():
            raise InputError(f"{txt}: no audio file {wav.name} beside the transcript")
        text = " ".join(txt.read_text(encoding="utf-8").split())
        speaker, chapter = (utt.split("_") + ["", ""])[:2]
        records.append(make_record(utt, "asr", question_audio=str(wav.resolve()),
                                   answer_text=text.lower() if lowercase else text,
                                   speaker=speaker, chapter=chapter, corpus="libritts"))
        if limit is not None and len(records) >= limit:
            break
    if not records:
        raise InputError(f"no LibriTTS transcripts (*.normalized.txt) under {root}")
    return records


def read_libri(root: str | os.PathLike, lowercase: bool = False, limit: int | None = None) -> list[dict]:
    """LibriSpeech or LibriTTS, whichever layout `root` holds."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"folder not found: {root}")
    if next(root.rglob("*.trans.txt"), None) is not None:
        return read_librispeech(root, lowercase, limit)
    if next(root.rglob("*.normalized.txt"), None) is not None:
        return read_libritts(root, lowercase, limit)
    raise InputError(f"{root} holds neither LibriSpeech (*.trans.txt + *.flac) nor LibriTTS "
                     "(*.wav + *.normalized.txt) files")


# ---------------------------------------------------------------------------------------------
# VoiceAssistant-400K parquet
# ---------------------------------------------------------------------------------------------

VA_COLUMNS = ("split_name", "index", "round", "question", "question_audio", "answer", "answer_snac")


def _audio_ext(data: bytes, name: str | None) -> str:
    if name and Path(name).suffix:
        return Path(name).suffix.lower()
    head = data[:12]
    if head[:4] == b"RIFF":
        return ".wav"
    if head[:4] == b"fLaC":
        return ".flac"
    if head[:4] == b"OggS":
        return ".ogg"
    if head[:3] == b"ID3" or head[:2] in (b"\xff\xfb", b"\xff\xf3", b"\xff\xf2"):
        return ".mp3"
    return ".wav"


def _parquet_files(src) -> list[Path]:
    srcs = [src] if isinstance(src, (str, os.PathLike)) else list(src)
    files: list[Path] = []
    for s in srcs:
        p = Path(s)
        if p.is_dir():
            files += sorted(p.rglob("*.parquet"))
        elif p.is_file():
            files.append(p)
        else:
            raise InputError(f"parquet file or folder not found: {p}")
    if not files:
        raise InputError(f"no .parquet files in {src}")
    return files


def iter_voiceassistant(src, out_dir: str | os.PathLike, limit: int | None = None,
                        batch_size: int = 256) -> Iterator[dict]:
    """Stream VoiceAssistant-400K rows as 'qa' records. Question audio bytes are written to
    <out_dir>/audio/<id><ext>; `answer_snac` strings become frames; `question` goes to the extra
    field `question_transcript` (the audio is the question). Needs pyarrow (the `data` extra)."""
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError("reading VoiceAssistant-400K parquet files needs pyarrow: pip install pyarrow "
                          "(the omnitalk[data] extra)") from e
    audio_dir = Path(out_dir) / "audio"
    audio_dir.mkdir(parents=True, exist_ok=True)
    n = 0
    for file in _parquet_files(src):
        pf = pq.ParquetFile(file)
        names = set(pf.schema_arrow.names)
        missing = [c for c in ("question_audio", "answer", "answer_snac") if c not in names]
        if missing:
            raise InputError(f"{file} lacks VoiceAssistant-400K columns {missing}; found {sorted(names)}")
        cols = [c for c in VA_COLUMNS if c in names]
        row_in_file = 0
        for batch in pf.iter_batches(batch_size=batch_size, columns=cols):
            for row in batch.to_pylist():
                where = f"{file} row {row_in_file}"
                row_in_file += 1
                rid = "va-{}-{}-{}".format(row.get("split_name", "x"), row.get("index", row_in_file - 1),
                                           row.get("round", 0))
                rid = re.sub(r"[^\w.-]+", "_", rid)
                qa = row["question_audio"]
                data, name = (qa.get("bytes"), qa.get("path")) if isinstance(qa, dict) else (qa, None)
                if data:
                    audio = audio_dir / (rid + _audio_ext(data, name))
                    if not audio.is_file() or audio.stat().st_size != len(data):
                        audio.write_bytes(data)
                elif name and Path(file.parent, name).is_file():
                    audio = Path(file.parent, name)
                else:
                    raise InputError(f"{where}: question_audio has no bytes and no readable path")
                try:
                    frames = parse_snac_string(row["answer_snac"])
                except InputError as e:
                    raise InputError(f"{where}: {e}") from None
                yield make_record(rid, "qa", question_audio=str(audio.resolve()), answer_text=row["answer"],
                                  answer_snac=frames.tolist(), speak=True, question_transcript=row.get("question"),
                                  corpus="voiceassistant-400k")
                n += 1
                if limit is not None and n >= limit:
                    return


def read_voiceassistant(src, out_dir: str | os.PathLike, limit: int | None = None) -> list[dict]:
    """All of iter_voiceassistant as a list."""
    return list(iter_voiceassistant(src, out_dir, limit))


# ---------------------------------------------------------------------------------------------
# answer audio -> SNAC frames
# ---------------------------------------------------------------------------------------------

def load_wav(path, sr: int) -> np.ndarray:
    """Any soundfile-readable file -> float32 mono at `sr` (resampled with soxr)."""
    import soundfile as sf

    from omnitalk.audio import resample

    x, file_sr = sf.read(str(path), dtype="float32", always_2d=True)
    x = x.mean(axis=1) if x.shape[1] > 1 else x[:, 0]
    return resample(x, file_sr, sr)


def encode_audio_file(path, codec) -> np.ndarray:
    """An audio file -> SNAC frames (n, 7) with `codec` (Codec.encode at its sample rate, 24 kHz)."""
    return codec.encode(load_wav(path, codec.sample_rate))


def encode_answers(records: Sequence[dict], codec, progress: bool = True, overwrite: bool = False,
                   fields: Sequence[tuple[str, str]] = (("answer_audio", "answer_snac"),
                                                         ("listen_audio", "listen_frames"))) -> list[dict]:
    """Fill `answer_snac` from `answer_audio` (and `listen_frames` from `listen_audio`) with the codec.

    Returns new record dicts; records that already have codes are kept unless overwrite. Audio is read
    with soundfile, mixed to mono and resampled to the codec's rate (24 kHz) before Codec.encode.
    Interrupt records whose label count disagrees with the encoded frame count raise.
    """
    from tqdm.auto import tqdm

    out = [dict(r) for r in records]
    todo = [(r, src, dst) for r in out for src, dst in fields
            if r.get(src) is not None and (overwrite or r.get(dst) is None)]
    for r, src, dst in tqdm(todo, desc="SNAC codes", unit="file", disable=not progress or not todo):
        frames = encode_audio_file(r[src], codec)
        if dst == "listen_frames" and r.get("labels") is not None and len(r["labels"]) != len(frames):
            raise InputError(f"record {r['id']}: {src} encodes to {len(frames)} frames but it has "
                             f"{len(r['labels'])} labels")
        r[dst] = frames.tolist()
    return out


# ---------------------------------------------------------------------------------------------
# cached encoder features
# ---------------------------------------------------------------------------------------------

def file_digest(path, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            b = fh.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def module_fingerprint(module: torch.nn.Module, tag: str = "") -> str:
    """A short identity of an encoder: sha256 over its tensors' names, dtypes, shapes and values."""
    h = hashlib.sha256(tag.encode())
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0


class FeatureCache:
    """Encoder outputs on disk, so training never runs the frozen encoders twice.

    audio(path): Whisper encoder output for the clip's first L frames, L = int(ms / 20) + 1 (as the
    engine uses them), shape (L, d_whisper), before the model's whisper_adapter.
    image(path): CLIP vision output (50, d_clip) (class token + 49 patches), before vision_adapter.

    Files: <cache_dir>/whisper-<encoder id>/<sha[:2]>/<sha>.safetensors (and clip-<id>/...), where sha is
    the sha256 of the input file's bytes and the encoder id a fingerprint of the encoder's weights: a
    changed file or a different encoder never reuses a stale entry. `model` is an OmniModel or anything
    with `.whisper` / `.clip` modules (and optionally `.device`).
    """

    def __init__(self, cache_dir: str | os.PathLike, model, dtype: torch.dtype = torch.float32):
        self.dir = Path(cache_dir)
        self.model, self.dtype = model, dtype
        self.stats = {"audio": CacheStats(), "image": CacheStats()}
        self._ids: dict[str, str] = {}
        self._digests: dict[tuple, str] = {}

    # ---- identities -------------------------------------------------------------------------
    def encoder_id(self, kind: str) -> str:
        if kind not in self._ids:
            enc = self._encoder(kind)
            extra = (f"L=int(ms/20)+1:{getattr(enc, 'window', 'exact')}" if kind == "audio"
                     else f"res={enc.dims.image_resolution}")
            self._ids[kind] = module_fingerprint(enc, f"{kind}:{extra}")
        return self._ids[kind]

    def _encoder(self, kind: str):
        enc = getattr(self.model, "whisper" if kind == "audio" else "clip", None)
        if enc is None:
            raise InputError(f"the model has no {'Whisper' if kind == 'audio' else 'CLIP'} encoder "
                             f"for {kind} features")
        return enc

    def _device(self, kind: str):
        return next(self._encoder(kind).parameters()).device

    def _digest(self, path) -> str:
        st = os.stat(path)
        key = (str(Path(path).resolve()), st.st_mtime_ns, st.st_size)
        if key not in self._digests:
            self._digests[key] = file_digest(path)
        return self._digests[key]

    def path_for(self, kind: str, path) -> Path:
        sha = self._digest(path)
        name = "whisper" if kind == "audio" else "clip"
        return self.dir / f"{name}-{self.encoder_id(kind)}" / sha[:2] / f"{sha}.safetensors"

    def has(self, kind: str, path) -> bool:
        return self.path_for(kind, path).is_file()

    # ---- lookups ----------------------------------------------------------------------------
    def audio(self, path) -> torch.Tensor:
        """(L, d_whisper) features of an audio file, computed and stored on a miss."""
        return self._get("audio", path)

    def image(self, path) -> torch.Tensor:
        """(50, d_clip) features of an image file, computed and stored on a miss."""
        return self._get("image", path)

    def _get(self, kind: str, path) -> torch.Tensor:
        from safetensors.torch import load_file

        f = self.path_for(kind, path)
        if f.is_file():
            self.stats[kind].hits += 1
            return load_file(str(f))["features"]
        self.stats[kind].misses += 1
        feats = self._compute(kind, [path])[0]
        self._store(f, feats, path)
        return feats

    def _store(self, f: Path, feats: torch.Tensor, src) -> None:
        from safetensors.torch import save_file

        f.parent.mkdir(parents=True, exist_ok=True)
        tmp = f.with_name(f.name + f".{os.getpid()}.tmp")
        save_file({"features": feats.contiguous()}, str(tmp), metadata={"source": str(src)})
        tmp.replace(f)

    @torch.inference_mode()
    def _compute(self, kind: str, paths: Sequence) -> list[torch.Tensor]:
        if kind == "audio":
            from omnitalk import audio as audio_io
            from omnitalk.model.whisper import encode as whisper_encode, features as whisper_features

            enc = self._encoder("audio")
            xs = [audio_io.load_audio(p) for p in paths]
            for p, x in zip(paths, xs):
                try:
                    audio_io.check_duration(x)
                except InputError as e:
                    raise InputError(f"{p}: {e}") from None
            if getattr(enc, "window", "exact") == "trimmed":  # one at a time: padding would change them
                return [whisper_features(enc, x).to("cpu", self.dtype).clone() for x in xs]
            mels = torch.stack([audio_io.log_mel_spectrogram(x) for x in xs])  # (B, 80, 3000)
            out = whisper_encode(enc, mels)  # (B, 1500, d)
            return [out[i, :audio_io.num_whisper_frames(len(x))].to("cpu", self.dtype).clone()
                    for i, x in enumerate(xs)]
        from omnitalk import vision

        clip = self._encoder("image")
        imgs = [vision.preprocess_image(vision.load_image(p, convert_rgb=False), size=clip.dims.image_resolution)
                for p in paths]
        out = clip(torch.stack(imgs).to(self._device("image")))  # (B, 50, d)
        return [o.to("cpu", self.dtype).clone() for o in out]

    def prepare(self, records: Sequence[dict], progress: bool = True, batch_size: int = 8,
                audio: bool = True, images: bool = True) -> dict:
        """Compute every missing feature of `records` (question_audio, question_image) in batches.
        Returns {'audio': {'hits', 'misses'}, 'image': {...}} for this call."""
        from tqdm.auto import tqdm

        report = {}
        for kind, field, on in (("audio", "question_audio", audio), ("image", "question_image", images)):
            paths = list(dict.fromkeys(r[field] for r in records if r.get(field)))
            if not on or not paths:
                report[kind] = {"hits": 0, "misses": 0}
                continue
            todo = [p for p in paths if not self.has(kind, p)]
            report[kind] = {"hits": len(paths) - len(todo), "misses": len(todo)}
            self.stats[kind].hits += len(paths) - len(todo)
            self.stats[kind].misses += len(todo)
            name = "Whisper features" if kind == "audio" else "CLIP features"
            with tqdm(total=len(todo), desc=name, unit="file", disable=not progress or not todo) as bar:
                for i in range(0, len(todo), batch_size):
                    chunk = todo[i:i + batch_size]
                    for p, feats in zip(chunk, self._compute(kind, chunk)):
                        self._store(self.path_for(kind, p), feats, p)
                    bar.update(len(chunk))
        return report
