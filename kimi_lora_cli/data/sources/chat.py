"""Chat JSON: LLaMA-Factory (sharegpt `messages`/`conversations` with role/content or from/value, alpaca
instruction/input/output, `audios` filled in at `<audio>` placeholders; its dataset_info.json entry
honoured), ms-swift (`messages` + `audios`) and OpenAI-style content parts (`input_audio`, `audio`).

Kimi-Audio has user and assistant turns only: a system prompt becomes the first user text message.
An `<audio>` in an assistant turn is speech the model learns to say (task_type speech_conversation).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kimi_lora_cli.data.audio import AudioError
from kimi_lora_cli.data.sources.base import Record, Source, SourceOptions, find_audio, one_line
from kimi_lora_cli.data.sources.clips import ClipStore
from kimi_lora_cli.data.sources.jsonl import json_objects
from kimi_lora_cli.errors import DataError

PLACEHOLDER = "<audio>"
ROLE_NAMES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "system": "system"}
EXAMPLE = '{"messages": [{"role": "user", "content": "<audio>What is said?"}, {"role": "assistant", ' \
          '"content": "hello"}], "audios": ["a.wav"]}'


class RowProblem(ValueError):
    pass


def dataset_info_entry(path: Path) -> dict[str, Any]:
    """LLaMA-Factory's dataset_info.json entry for this file (matched by file_name), or {}."""
    info = path.parent / "dataset_info.json"
    if not info.is_file():
        return {}
    try:
        entries = json.loads(info.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{info}: not valid JSON ({e}); fix it or move it away from {path.name}") from None
    if not isinstance(entries, dict):
        return {}
    for entry in entries.values():
        if isinstance(entry, dict) and Path(str(entry.get("file_name", ""))).name == path.name:
            return entry
    return {}


class ChatConverter:
    """One chat row -> the official conversation; RowProblem says what is wrong with the row."""

    def __init__(self, folder: Path, clips: ClipStore, entry: dict[str, Any], where: str) -> None:
        self.folder, self.clips = folder, clips
        self.formatting = entry.get("formatting")
        self.columns: dict[str, str] = dict(entry.get("columns") or {})
        tags = dict(entry.get("tags") or {})
        self.role_key, self.content_key = tags.get("role_tag"), tags.get("content_tag")
        self.roles = dict(ROLE_NAMES)
        for tag, role in (("user_tag", "user"), ("assistant_tag", "assistant"), ("system_tag", "system")):
            if tag in tags:
                self.roles[str(tags[tag])] = role
        self.where = where

    # -- audio ---------------------------------------------------------------------------------
    def audio_file(self, value: Any) -> str:
        if isinstance(value, dict):  # {"path": ...} or {"bytes": ...} as some exports write them
            if value.get("bytes"):
                return self.clips.encoded(bytes(value["bytes"]), self.where)
            value = value.get("path")
        if not isinstance(value, str) or not value.strip():
            raise RowProblem(f"an audio entry must be a file path (got {value!r})")
        if value.startswith(("http://", "https://")):
            raise RowProblem(f"audio {value!r} is a URL; kimi-lora reads local files only: download it first")
        if value.startswith("data:"):
            return self.inline(value.partition(",")[2])
        return find_audio(value, self.folder)

    def inline(self, data: str) -> str:
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise RowProblem("input_audio data is not base64; give the audio file's bytes base64-encoded") from None
        try:
            return self.clips.encoded(raw, self.where)
        except AudioError as e:
            raise RowProblem(one_line(e)) from None

    def part_audio(self, part: dict[str, Any]) -> str:
        if part.get("type") == "input_audio":
            ia = part.get("input_audio")
            data = ia.get("data") if isinstance(ia, dict) else ia
            if not isinstance(data, str):
                raise RowProblem("input_audio needs {\"data\": BASE64, \"format\": \"wav\"}")
            return self.inline(data)
        for key in ("path", "audio", "audio_url", "url"):
            if key in part:
                value = part[key]
                if isinstance(value, dict):
                    value = value.get("url") or value.get("path")
                return self.audio_file(value)
        raise RowProblem(f"audio part {json.dumps(part)[:80]} names no file (use \"path\")")

    # -- messages --------------------------------------------------------------------------------
    def messages_of(self, obj: dict[str, Any]) -> tuple[list[tuple[str, Any]], str | None]:
        """[(role, content)] in the file's order, and a system prompt."""
        system = obj.get(self.columns.get("system", "system"))
        if self.formatting == "alpaca" or (self.formatting is None and "instruction" in obj
                                           and "messages" not in obj and "conversations" not in obj):
            c = {"prompt": "instruction", "query": "input", "response": "output", "history": "history",
                 **self.columns}
            turns: list[tuple[str, Any]] = []
            for pair in obj.get(c["history"]) or []:
                if isinstance(pair, (list, tuple)) and len(pair) == 2:
                    turns += [("user", pair[0]), ("assistant", pair[1])]
            prompt = "\n".join(str(obj[k]) for k in (c["prompt"], c["query"]) if obj.get(k))
            turns += [("user", prompt), ("assistant", obj.get(c["response"]))]
            return turns, system
        key = self.columns.get("messages") or ("messages" if "messages" in obj else "conversations")
        msgs = obj.get(key)
        if not isinstance(msgs, list) or not msgs:
            raise RowProblem(f"missing {key!r} (keys: {', '.join(sorted(obj))}); a chat line looks like {EXAMPLE}")
        turns = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict):
                raise RowProblem(f"message {i}: expected an object with role and content")
            rk = self.role_key or ("role" if "role" in m else "from")
            ck = self.content_key or ("content" if "content" in m else "value")
            if rk not in m or ck not in m:
                raise RowProblem(f"message {i}: missing {rk!r} or {ck!r} (keys: {', '.join(sorted(m))})")
            role = self.roles.get(str(m[rk]))
            if role is None:
                raise RowProblem(f"message {i}: unknown role {m[rk]!r}; use user/human, assistant/gpt or system "
                                 "(or name yours with tags in dataset_info.json)")
            turns.append((role, m[ck]))
        return turns, system

    def convert(self, obj: Any) -> dict[str, Any]:
        if not isinstance(obj, dict):
            raise RowProblem(f"expected a JSON object like {EXAMPLE}")
        turns, system = self.messages_of(obj)
        audios = obj.get(self.columns.get("audios", "audios")) or []
        if not isinstance(audios, list):
            audios = [audios]
        placeholders = sum(c.count(PLACEHOLDER) for _, c in turns if isinstance(c, str))
        if placeholders != len(audios):
            raise RowProblem(f"{placeholders} {PLACEHOLDER} placeholder{'s' if placeholders != 1 else ''} in the "
                             f"messages but {len(audios)} entr{'ies' if len(audios) != 1 else 'y'} in audios; put "
                             f"one {PLACEHOLDER} where each audio file is heard")
        queue = iter(audios)
        conversation: list[dict[str, Any]] = []
        if isinstance(system, str) and system.strip():
            conversation.append({"role": "user", "message_type": "text", "content": system.strip()})
        for i, (role, content) in enumerate(turns):
            if role == "system":
                if isinstance(content, str) and content.strip():
                    conversation.append({"role": "user", "message_type": "text", "content": content.strip()})
                continue
            for kind, value in self.pieces(content, queue, i):
                conversation.append({"role": role, "message_type": kind, "content": value})
        if not conversation:
            raise RowProblem("no messages")
        speech = any(m["role"] == "assistant" and m["message_type"] == "audio" for m in conversation)
        return {"task_type": "speech_conversation" if speech else "understanding", "conversation": conversation}

    def pieces(self, content: Any, audios: Iterator[Any], index: int) -> Iterator[tuple[str, str]]:
        if content is None:
            raise RowProblem(f"message {index}: empty content")
        if isinstance(content, str):
            parts = content.split(PLACEHOLDER)
            for k, text in enumerate(parts):
                if text.strip():
                    yield "text", text.strip()
                if k < len(parts) - 1:
                    value = next(audios, None)
                    if value is None:
                        raise RowProblem(f"message {index}: more {PLACEHOLDER} placeholders than entries in audios")
                    yield "audio", self.audio_file(value)
            return
        if isinstance(content, list):
            for part in content:
                if isinstance(part, str):
                    yield from self.pieces(part, audios, index)
                elif isinstance(part, dict) and part.get("type") == "text":
                    if str(part.get("text", "")).strip():
                        yield "text", str(part["text"]).strip()
                elif isinstance(part, dict) and part.get("type") in ("input_audio", "audio", "audio_url"):
                    yield "audio", self.part_audio(part)
                else:
                    raise RowProblem(f"message {index}: content part {json.dumps(part)[:80]} is neither text nor "
                                     "audio")
            return
        raise RowProblem(f"message {index}: content must be text or a list of parts")


def chat_source(path: Path, opts: SourceOptions, clips: ClipStore) -> Source:
    folder = path.parent.resolve()
    entry = dataset_info_entry(path)

    def rows() -> Iterator[Record]:
        for rec in json_objects(path):
            if rec.error is not None:
                yield rec
                continue
            conv = ChatConverter(folder, clips, entry, rec.where)
            try:
                yield Record(rec.number, rec.where, conv.convert(rec.obj), None, rec.text)
            except RowProblem as e:
                yield Record(rec.number, rec.where, None, str(e), rec.text)
            except AudioError as e:
                yield Record(rec.number, rec.where, None, one_line(e), rec.text)

    return Source("chat", str(path), folder, rows)
