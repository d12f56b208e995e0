"""`kimi-lora serve` on the tiny checkpoint: a real server on a free localhost port, driven with the
`openai` client and plain HTTP, its answers compared with `kimi-lora infer` on the same clip and adapter."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from _infer_data import write_asr_data  # noqa: E402
from serve_helpers import Recorder  # noqa: E402

STEPS = "8"
EN = "Please transcribe the spoken content into written text."
ZH = "请将音频内容转换为文字。"
SPOKEN = {"audio_temperature": 1.0, "audio_top_k": 0}  # the tiny model then says something
SPOKEN_FLAGS = ("--audio-temperature", "1.0", "--audio-top-k", "0")


def _until(condition, what: str, limit_s: float = 60.0) -> None:
    """Wait for a state the server reaches by itself (not a timing assert: the limit only stops a hang)."""
    deadline = time.monotonic() + limit_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.01)


@pytest.fixture(scope="module")
def clips(tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("clips")
    write_asr_data(folder, tiny.config, n=4, with_tokens=False)
    return [folder / f"clip{k}.wav" for k in range(4)]


def _spec(tiny_dir, adapter_dirs, tiny_speech_tokenizer_dir, tiny_detok_dir, **kw):
    from kimi_lora_cli.serving.spec import ServeSpec

    base = dict(model=tiny_dir, adapters=tuple(adapter_dirs.items()), speech_tokenizer=tiny_speech_tokenizer_dir,
                detokenizer=tiny_detok_dir, max_new_tokens=int(STEPS), max_audio_seconds=5.0, max_upload_mb=1.0,
                ode_steps=4)
    return ServeSpec(**{**base, **kw})


@pytest.fixture(scope="module")
def server(tiny_dir, adapter_dirs, tiny_speech_tokenizer_dir, tiny_detok_dir):
    from kimi_lora_cli.serving.engine import Engine
    from kimi_lora_cli.serving.server import BackgroundServer

    engine = Engine(_spec(tiny_dir, adapter_dirs, tiny_speech_tokenizer_dir, tiny_detok_dir))
    with BackgroundServer(engine) as url:
        yield url, engine


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0)


def _infer(cli, tiny_dir, adapter_dirs, speech_dir, prompt, clip, *extra):
    """{variant: prediction record} of `kimi-lora infer --prompt PROMPT --audio CLIP` with both adapters and base."""
    args = ["infer", "-m", tiny_dir, "--compare-base", *[f for n, d in adapter_dirs.items() for f in ("-a", f"{n}={d}")],
            "--prompt", prompt, "--speech-tokenizer", speech_dir, "--max-new-tokens", STEPS, "--json", *extra]
    if clip is not None:
        args[args.index("--prompt"):args.index("--prompt")] = ["--audio", clip]
    code, out, err = cli(*args)
    assert code == 0, err
    return {r["adapter"]: r for r in json.loads(out)["predictions"]}


# -- answers equal `infer` -------------------------------------------------------------------------


def test_transcription_equals_infer_on_the_same_clip_and_adapter(cli, client, server, tiny_dir, adapter_dirs,
                                                                 tiny_speech_tokenizer_dir, clips):
    url = server[0]
    want = _infer(cli, tiny_dir, adapter_dirs, tiny_speech_tokenizer_dir, EN, clips[1])
    assert len({r["prediction"] for r in want.values()}) > 1  # the adapters change the answer
    for model in ("base", "a", "b"):
        with open(clips[1], "rb") as f:
            got = client.audio.transcriptions.create(model=model, file=f)
        assert got.text == want[model]["prediction"]
    # response formats: plain text, verbose_json with the duration
    with open(clips[1], "rb") as f:
        text = httpx.post(f"{url}/v1/audio/transcriptions", data={"model": "a", "response_format": "text"},
                          files={"file": ("c.wav", f, "audio/wav")})
    assert text.status_code == 200 and text.text == want["a"]["prediction"]
    with open(clips[1], "rb") as f:
        verbose = client.audio.transcriptions.create(model="a", file=f, response_format="verbose_json")
    assert verbose.text == want["a"]["prediction"] and verbose.duration == pytest.approx(3 * 1280 / 16000)

    # language=zh is the official Chinese instruction; `prompt` replaces the instruction
    zh = _infer(cli, tiny_dir, adapter_dirs, tiny_speech_tokenizer_dir, ZH, clips[1])
    custom = _infer(cli, tiny_dir, adapter_dirs, tiny_speech_tokenizer_dir, "what is said here?", clips[1])
    with open(clips[1], "rb") as f:
        assert client.audio.transcriptions.create(model="b", file=f, language="zh").text == zh["b"]["prediction"]
    with open(clips[1], "rb") as f:
        assert client.audio.transcriptions.create(model="b", file=f, prompt="what is said here?").text == \
            custom["b"]["prediction"]


def test_a_clip_past_30_seconds_is_transcribed_as_infer_does(cli, tiny_dir, adapter_dirs, tiny_speech_tokenizer_dir,
                                                                 tmp_path, caplog):
    """Whisper takes 30 s pieces: a 31.5 s upload (two pieces) is served like `infer --audio` serves it."""
    import numpy as np
    import soundfile as sf

    from kimi_lora_cli.serving.engine import Engine
    from kimi_lora_cli.serving.server import BackgroundServer

    t = np.arange(int(31.5 * 16000)) / 16000
    wave = 0.2 * np.sin(2 * np.pi * (180 + 40 * np.sin(t)) * t) + 0.02 * np.random.RandomState(5).randn(t.size)
    clip = tmp_path / "long.wav"
    sf.write(clip, wave.astype("float32"), 16000)
    want = _infer(cli, tiny_dir, adapter_dirs, tiny_speech_tokenizer_dir, EN, clip)
    engine = Engine(_spec(tiny_dir, adapter_dirs, tiny_speech_tokenizer_dir, None, max_audio_seconds=40.0,
                          max_upload_mb=4.0))
    caplog.set_level("INFO", logger="kimi_lora.serve")
    with BackgroundServer(engine) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        for model in ("base", "a"):
            with open(clip, "rb") as f:
                got = client.audio.transcriptions.create(model=model, file=f, response_format="verbose_json")
            assert got.text == want[model]["prediction"] and got.duration == pytest.approx(31.5)
    # both pieces reached the prompt: 394 audio positions (12.5 Hz: 375 + 19) besides the instruction
    prompts = [int(m.split("prompt=")[1].split()[0]) for m in caplog.messages if "prompt=" in m]
    assert len(prompts) == 2 and all(394 < p < 394 + 40 for p in prompts), prompts


def test_chat_parts_are_consecutive_messages_and_text_chat_equals_infer(cli, client, tiny_dir, adapter_dirs,
                                                                        tiny_speech_tokenizer_dir, clips):
    want = _infer(cli, tiny_dir, adapter_dirs, tiny_speech_tokenizer_dir, EN, clips[2])
    audio = base64.b64encode(clips[2].read_bytes()).decode()
    got = client.chat.completions.create(model="a", max_tokens=int(STEPS), messages=[{"role": "user", "content": [
        {"type": "text", "text": EN}, {"type": "input_audio", "input_audio": {"data": audio, "format": "wav"}}]}])
    assert got.choices[0].message.content == want["a"]["prediction"]
    assert got.usage.completion_tokens == want["a"]["new_tokens"]

    text_only = _infer(cli, tiny_dir, adapter_dirs, tiny_speech_tokenizer_dir, "hello world", None)
    got = client.chat.completions.create(model="b", messages=[{"role": "user", "content": "hello world"}])
    assert got.choices[0].message.content == text_only["b"]["prediction"]
    assert got.choices[0].finish_reason in ("stop", "length")


def test_spoken_answer_is_the_wav_infer_writes_for_the_same_seed(cli, client, tiny_dir, tiny_detok_dir, adapter_dirs,
                                                                  tiny_speech_tokenizer_dir, clips, tmp_path):
    import soundfile as sf

    wavs = tmp_path / "wavs"
    want = _infer(cli, tiny_dir, adapter_dirs, tiny_speech_tokenizer_dir, "say it", clips[0], "--output-type", "both",
                  "--audio-dir", wavs, "--detokenizer", tiny_detok_dir, "--ode-steps", "4", "--seed", "2",
                  "--max-new-tokens", "40", *SPOKEN_FLAGS)
    audio = base64.b64encode(clips[0].read_bytes()).decode()
    spoken = 0
    for model in ("base", "a"):
        got = client.chat.completions.create(
            model=model, max_tokens=40, seed=2, modalities=["text", "audio"],
            audio={"voice": "default", "format": "wav"}, extra_body=SPOKEN,
            messages=[{"role": "user", "content": [{"type": "text", "text": "say it"},
                                                   {"type": "input_audio", "input_audio": {"data": audio}}]}])
        message = got.choices[0].message
        assert message.content == want[model]["prediction"] == message.audio.transcript
        wav = base64.b64decode(message.audio.data)
        if want[model]["audio_path"] is None:
            assert wav == b""
            continue
        spoken += 1
        assert wav == Path(want[model]["audio_path"]).read_bytes()  # byte for byte
        assert sf.info(io.BytesIO(wav)).samplerate == 24000
    assert spoken  # at least one of them said something


def test_streaming_gives_the_same_text_and_audio_as_one_answer(client, server):
    import numpy as np
    import soundfile as sf

    from kimi_lora_cli.models.detokenizer.streaming import plan_chunks

    ask = dict(model="a", max_tokens=120, seed=5, temperature=0.7, extra_body=SPOKEN,
               messages=[{"role": "user", "content": "hello world"}])
    whole = client.chat.completions.create(**ask)
    deltas = [c.choices[0].delta.content for c in client.chat.completions.create(**ask, stream=True)
              if c.choices and c.choices[0].delta.content]
    assert len(deltas) > 1 and "".join(deltas) == whole.choices[0].message.content

    spoken = dict(model="a", max_tokens=400, seed=3, extra_body=SPOKEN, messages=ask["messages"],
                  modalities=["text", "audio"], audio={"voice": "default", "format": "wav"})
    whole = client.chat.completions.create(**spoken)
    text, pieces, finish, usage = [], [], None, None
    for c in client.chat.completions.create(**spoken, stream=True, stream_options={"include_usage": True}):
        if c.usage is not None:
            usage = c.usage
        if not c.choices:
            continue
        delta = c.choices[0].delta
        text.append(delta.content or "")
        data = getattr(getattr(delta, "audio", None), "data", None)
        if data:
            pieces.append(np.frombuffer(base64.b64decode(data), dtype="<i2"))
        finish = c.choices[0].finish_reason or finish
    assert "".join(text) == whole.choices[0].message.content
    assert finish == whole.choices[0].finish_reason and usage.completion_tokens == whole.usage.completion_tokens
    samples, _ = sf.read(io.BytesIO(base64.b64decode(whole.choices[0].message.audio.data)), dtype="int16")
    codes = len(samples) // 1920
    assert codes > 30, "the tiny model should say more than one 30-code chunk here"
    assert len(pieces) == len(plan_chunks(codes))  # one piece per detokenizer chunk, as they were ready
    assert np.array_equal(np.concatenate(pieces), samples)


def test_a_concurrent_burst_over_two_adapters_equals_infer(cli, client, server, tiny_dir, adapter_dirs,
                                                           tiny_speech_tokenizer_dir, clips):
    want = {k: _infer(cli, tiny_dir, adapter_dirs, tiny_speech_tokenizer_dir, EN, clip) for k, clip in enumerate(clips)}
    jobs = [(model, k) for k in range(len(clips)) for model in ("a", "b", "base")]

    def one(job):
        model, k = job
        with open(clips[k], "rb") as f:
            return client.audio.transcriptions.create(model=model, file=f).text

    with ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(one, jobs))
    assert got == [want[k][model]["prediction"] for model, k in jobs]


def test_mixed_adapters_in_one_decode_and_adapters_swapped_in_and_out(cli, tiny_dir, adapter_dirs,
                                                                      tiny_speech_tokenizer_dir, tiny_detok_dir, clips):
    """The engine itself: jobs for base, a and b decoded as ONE batch equal `infer`; with room for a single
    adapter, the queue is split by adapter (base rows join any batch) and adapters are swapped on demand."""
    from kimi_lora_cli.serving.engine import Engine, Job

    want = {k: _infer(cli, tiny_dir, adapter_dirs, tiny_speech_tokenizer_dir, EN, clip) for k, clip in enumerate(clips)}

    for slots, batches, largest in ((0, 1, 12), (1, 2, 8)):  # one slot: a + base rows, then b (+ nothing)
        engine = Engine(_spec(tiny_dir, adapter_dirs, tiny_speech_tokenizer_dir, None, max_loaded_adapters=slots,
                              max_batch_size=16))
        sink = Recorder()
        jobs = []
        for k, clip in enumerate(clips):
            for model in ("a", "base", "b"):
                messages = [{"role": "user", "message_type": "text", "content": EN},
                            {"role": "user", "message_type": "audio", "content": str(clip)}]
                jobs.append((model, k, Job(messages=messages, adapter=model, listener=sink)))
                engine.submit(jobs[-1][2])
        assert engine.run_pending() == batches
        assert engine.stats["largest_batch"] == largest
        for model, k, job in jobs:
            assert sink.results[id(job)].text == want[k][model]["prediction"], (slots, model, k)
        if slots == 1:
            assert engine.adapters.evictions >= 1 and len(engine.loaded.adapter_names) == 1
        engine.stop()


def test_jobs_that_come_during_a_decode_join_it_and_never_overtake_an_older_one(tiny_dir, adapter_dirs):
    """Step-level batching in the engine: jobs submitted while a batch decodes (here from its first job's
    `prepared` callback, so they are waiting at the first step boundary) join it when they can share it
    (same sampler settings; any attached adapter: a batch of one adapter then switches to the base plus
    per-row adapters), answer as when decoded alone, and end as their rows stop. A waiting job that
    cannot join is not overtaken: the later ones wait for the next decode with it."""
    from kimi_lora_cli.serving.engine import Engine, Job

    engine = Engine(_spec(tiny_dir, adapter_dirs, None, None, max_batch_size=8))

    def job(k, adapter="a", **kw):
        return Job(messages=[{"role": "user", "message_type": "text", "content": f"count to {k} please"}],
                   adapter=adapter, max_new_tokens=6, **kw)

    def sink_submitting(later):
        """A recorder that, when the first job's decode is about to start, queues `later`."""
        later = list(later)
        return Recorder(on_prepared=lambda: [engine.submit(later.pop(0)) for _ in range(len(later))])

    alone = Recorder()
    solo = {}
    for k, adapter in ((0, "a"), (1, "a"), (2, "b"), (3, "a")):
        one = job(k, adapter, listener=alone)
        engine.run_batch([one])
        solo[k] = alone.results[id(one)].text_tokens

    # 1 joins the decode of 0 at its first step boundary
    later = [job(1)]
    sink = sink_submitting(later)
    first = job(0, listener=sink)
    later[0].listener = sink
    before = dict(engine.stats)
    engine.run_batch([first])
    assert engine.stats["batches"] - before["batches"] == 1 and engine.stats["joined"] - before["joined"] == 1
    assert sink.results[id(first)].text_tokens == solo[0]
    assert sink.results[id(later[0])].text_tokens == solo[1]
    assert sink.results[id(later[0])].batch_rows == 2

    # b joins the a-decode too: from then on the batch runs the base + each row's adapter (StackedRows)
    later = [job(2, "b")]
    sink = sink_submitting(later)
    later[0].listener = sink
    first = job(0, listener=sink)
    before = dict(engine.stats)
    engine.run_batch([first])
    assert engine.stats["batches"] - before["batches"] == 1 and engine.stats["joined"] - before["joined"] == 1
    assert sink.results[id(first)].text_tokens == solo[0]
    assert sink.results[id(later[0])].text_tokens == solo[2]

    # a job that cannot share the decode (other sampler settings) is older than the second a-job: neither
    # joins; its decode comes next and the a-job goes with it if it can, else after it
    from kimi_lora_cli.inference.sampler import SamplingParams

    other, a_job = job(2, "b", text_sampling=SamplingParams(repetition_penalty=1.5)), job(3)
    sink = sink_submitting([other, a_job])
    other.listener = a_job.listener = sink
    first = job(0, listener=sink)
    before = dict(engine.stats)
    engine.run_batch([first])
    assert engine.stats["joined"] == before["joined"] and not (sink.results.keys() & {id(other), id(a_job)})
    assert engine.run_pending() == 2
    assert sink.order.index(id(other)) < sink.order.index(id(a_job))
    assert sink.results[id(a_job)].text_tokens == solo[3]
    engine.stop()


def test_a_failing_decode_ends_every_job_once_and_keeps_the_answers_already_given(tiny_dir, adapter_dirs,
                                                                                   monkeypatch):
    """Jobs taken to join a decode whose preparation fails get a 500 (they are in neither the queue nor the
    batch, so nothing else would answer them); a job whose row already ended keeps its answer when the
    batch fails later."""
    from kimi_lora_cli.serving.engine import Engine, Job, RequestError

    engine = Engine(_spec(tiny_dir, adapter_dirs, None, None, max_batch_size=8))

    def job(k, budget, **kw):
        return Job(messages=[{"role": "user", "message_type": "text", "content": f"count to {k} please"}],
                   adapter="a", max_new_tokens=budget, **kw)

    ends = []

    # 1. the joiner's preparation raises: the joiner and the running job both end with a 500
    pending = [job(1, 6)]
    joiner = pending[0]
    sink = Recorder(on_prepared=lambda: pending and engine.submit(pending.pop()))
    joiner.listener = sink
    first = job(0, 6, listener=sink)
    fill = engine._fill_codes

    def broken(jobs):
        if joiner in jobs:
            raise RuntimeError("speech tokenizer ran out of memory")
        return fill(jobs)

    monkeypatch.setattr(engine, "_fill_codes", broken)
    monkeypatch.setattr(sink, "done", lambda j, o: ends.append((j, o)))
    engine.start()  # the worker thread: a failing batch must not stop it
    engine.submit(first)
    _until(lambda: len(ends) >= 2, "both jobs ended")
    time.sleep(0.2)  # a second `done` for either would come now
    assert sorted(id(j) for j, _ in ends) == sorted([id(first), id(joiner)])  # once each
    assert all(isinstance(o, RequestError) and o.status == 500 and "ran out of memory" in o.message for _, o in ends)
    monkeypatch.setattr(engine, "_fill_codes", fill)

    # 2. a streaming job's listener fails after the 1-step job's row ended: that one keeps its answer, the
    #    failing one gets a 500
    class Failing(Recorder):
        def text(self, job, delta):
            if job is long_job and short_job.answered:
                raise RuntimeError("listener broke")
            job_steps.append(delta)

    job_steps = []
    failing = Failing()
    short_job, long_job = job(2, 1, listener=failing), job(3, 8, listener=failing, stream=True)
    engine.stop()
    with pytest.raises(RuntimeError, match="listener broke"):
        engine.run_batch([short_job, long_job])
    for j in (short_job, long_job):  # what the worker does with a failed batch
        engine._fail(j, RuntimeError("listener broke"))
    assert failing.order.count(id(short_job)) == 1 and failing.order.count(id(long_job)) == 1
    assert not isinstance(failing.results[id(short_job)], RequestError)
    assert failing.results[id(long_job)].status == 500


# -- refusals ---------------------------------------------------------------------------------------


def _wav_bytes(seconds: float) -> bytes:
    import numpy as np
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, (0.1 * np.sin(np.arange(int(seconds * 16000)) / 5)).astype("float32"), 16000, format="WAV")
    return buf.getvalue()


def _chat(**body):
    return {"model": "a", "messages": [{"role": "user", "content": "hi"}], **body}


def _audio_part(data: str, fmt: str = "wav"):
    return {"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": data, "format": fmt}}]}


BAD_CHATS = [
    (_chat(model="nope"), 404, "model 'nope' is not served here; use one of: base, a, b"),
    (_chat(model=str(Path("/etc"))), 404, "is not served here"),
    ({"messages": [{"role": "user", "content": "hi"}]}, 400, "model is required"),
    (_chat(temprature=0.5), 400, "unknown field 'temprature'"),
    (_chat(messages=[{"role": "user", "content": "hi", "colour": 1}]), 400, "unknown field 'colour' in messages[0]"),
    (_chat(messages=[]), 400, "messages"),
    (_chat(messages=[{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi"}]), 400,
     "role 'system' is not supported"),
    (_chat(messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]), 400,
     "the last message must be the user's"),
    (_chat(messages=[_audio_part("%%% not base64 %%%")]), 400, "messages[0].content[0].input_audio.data: not valid base64"),
    (_chat(messages=[_audio_part(base64.b64encode(b"RIFF????WAVEjunk" * 20).decode())]), 400,
     "messages[0].content[0].input_audio: cannot decode audio"),
    (_chat(messages=[_audio_part(base64.b64encode(_wav_bytes(6.0)).decode())]), 400,
     "lasts 6.0 s, over this server's limit of 5 s (--max-audio-seconds)"),
    (_chat(messages=[_audio_part(base64.b64encode(_wav_bytes(1.0)).decode(), "aac")]), 400, "format"),
    (_chat(max_tokens=100_000), 400, "max_tokens 100000 plus the prompt's"),
    (_chat(messages=[{"role": "user", "content": "the " * 9000}]), 400, "but the model's context is 8192"),
    (_chat(top_p=0.5), 400, "top-k, not top-p"),
    (_chat(n=2), 400, "n:"),
    (_chat(temperature=-1), 400, "temperature"),
]


@pytest.mark.parametrize("body, status, message", BAD_CHATS)
def test_every_bad_chat_request_gets_its_status_and_one_line(server, body, status, message):
    url = server[0]
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert message in error["message"] and "\n" not in error["message"] and "Traceback" not in r.text
    good = httpx.post(f"{url}/v1/chat/completions", json=_chat(max_tokens=2), timeout=60)  # still serving
    assert good.status_code == 200 and good.json()["usage"]["completion_tokens"] == 2


def test_bad_uploads_and_bodies(server, clips):
    url = server[0]

    def post(files=None, data=None, **kw):
        return httpx.post(f"{url}/v1/audio/transcriptions", files=files, data=data, timeout=60, **kw)

    wav = clips[0].read_bytes()
    cases = [
        (post(files={"file": ("x.wav", b"\0" * (2 << 20))}, data={"model": "a"}), 413,
         "over this server's limit of 1 MB (--max-upload-mb)"),
        (post(files={"file": ("x.wav", b"not audio at all")}, data={"model": "a"}), 400, "file: cannot decode audio"),
        (post(files={"file": ("x.wav", _wav_bytes(5.5))}, data={"model": "a"}), 400, "over this server's limit of 5 s"),
        (post(files={"file": ("x.wav", wav)}, data={"model": "a", "speed": "2"}), 400, "unknown field 'speed'"),
        (post(files={"file": ("x.wav", wav)}, data={"model": "zz"}), 404, "model 'zz' is not served here"),
        (post(files={"model": (None, "a")}), 400, "file is required"),
        (post(data={"model": "a"}), 400, "send multipart/form-data"),
        (post(files={"file": ("x.wav", wav)}, data={"model": "a", "response_format": "srt"}), 400,
         "response_format 'srt' is not supported"),
        (post(files={"file": ("x.wav", wav)}, data={"model": "a", "temperature": "hot"}), 400, "temperature"),
        (httpx.post(f"{url}/v1/audio/transcriptions", json={"model": "a"}), 400, "send multipart/form-data"),
        (httpx.post(f"{url}/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}),
         400, "the body is not JSON"),
        (httpx.post(f"{url}/v1/chat/completions", json=_chat(messages=[_audio_part("A" * (2 << 20))])), 413,
         "--max-upload-mb"),
        (httpx.get(f"{url}/v1/nowhere"), 404, "no route /v1/nowhere"),
    ]
    for r, status, message in cases:
        assert r.status_code == status, (message, r.text)
        assert message in r.json()["error"]["message"], r.text
    ok = post(files={"file": ("x.wav", wav)}, data={"model": "a"})
    assert ok.status_code == 200 and "text" in ok.json()
    assert server[1].queue.arriving_now == 0  # refused requests no longer count as arriving


def test_a_request_still_arriving_joins_the_decode_instead_of_waiting_behind_it():
    """The batcher waits --batch-wait-ms for company, and longer (up to 25x) while the web layer is still
    receiving requests: a burst of uploads becomes one decode. Without a request arriving it does not wait."""
    import threading

    from kimi_lora_cli.serving.batching import JobQueue
    from kimi_lora_cli.serving.jobs import Job
    from kimi_lora_cli.serving.spec import ServeSpec

    def run(counted: bool) -> list[int]:
        sizes = []
        done = threading.Event()

        def run_batch(batch):
            sizes.append(len(batch))
            if sum(sizes) == 2:
                done.set()

        spec = ServeSpec(model=Path("unused"), batch_wait_ms=200.0, max_batch_size=8)
        queue = JobQueue(spec, 1, run_batch, lambda job, outcome: None, {"requests": 0}, lambda job, e: None)
        queue.start()
        if counted:
            queue.arriving(+1)  # the second request's body is being received
        queue.submit(Job(messages=[]))
        time.sleep(1.5)  # far past --batch-wait-ms (0.2 s), well inside 25x it (5 s)
        queue.submit(Job(messages=[]), arrived=counted)
        assert done.wait(60)
        queue.stop()
        return sizes

    assert run(counted=True) == [2]
    assert run(counted=False) == [1, 1]


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == ["base", "a", "b"]
    assert client.models.retrieve("b").id == "b"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("c")
    health = httpx.get(server[0] + "/health").json()
    assert health["status"] == "ok" and health["audio_input"] and health["spoken_answers"]


def test_full_queue_answers_429_and_a_client_that_leaves_is_cancelled(tiny_dir, adapter_dirs,
                                                                       tiny_speech_tokenizer_dir):
    from kimi_lora_cli.serving.engine import Engine
    from kimi_lora_cli.serving.server import BackgroundServer

    engine = Engine(_spec(tiny_dir, adapter_dirs, tiny_speech_tokenizer_dir, None, max_queue=1, max_batch_size=1))
    with BackgroundServer(engine) as url:
        long = {"model": "a", "messages": [{"role": "user", "content": "hello world"}], "max_tokens": 6000,
                "stream": True}
        with httpx.Client(timeout=60) as http, http.stream("POST", f"{url}/v1/chat/completions", json=long) as stream:
            lines = stream.iter_lines()
            assert next(lines).startswith("data: ")  # decoding (the one batch slot is taken)
            _until(lambda: engine.stats["running"] == 1, "the long request is decoding")
            waiting = ThreadPoolExecutor(1).submit(httpx.post, f"{url}/v1/chat/completions", json=_chat(max_tokens=2),
                                                   timeout=60)
            _until(lambda: engine.waiting == 1, "the second request waits")
            full = httpx.post(f"{url}/v1/chat/completions", json=_chat(max_tokens=2), timeout=60)
            assert full.status_code == 429 and full.headers["retry-after"] == "1"
            assert "--max-queue" in full.json()["error"]["message"]
        # the stream's client left: its generation stops, the waiting request is served
        _until(lambda: engine.stats["cancelled"] == 1, "the abandoned stream is cancelled")
        assert waiting.result().status_code == 200


# -- auth and the command ----------------------------------------------------------------------------


def test_api_key_from_the_environment_and_the_command_line(tiny_dir, tmp_path):
    env = {**os.environ, "KIMI_LORA_API_KEY": "s3cret", "PYTHONPATH": os.pathsep.join(sys.path),
           "OMP_NUM_THREADS": "1"}
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "kimi_lora_cli", "serve", "-m", str(tiny_dir), "--port", "0"],
                            stdout=log, stderr=subprocess.STDOUT, env=env, text=True)
    try:
        _until(lambda: "Serving on" in (tmp_path / "serve.log").read_text() or proc.poll() is not None,
               "the server starts", 120)
        text = (tmp_path / "serve.log").read_text()
        assert "Serving on" in text, text
        assert "API key" in text and "required" in text and "s3cret" not in text
        url = text.split("Serving on ")[1].split()[0]
        body = _chat(model="base", max_tokens=2)
        assert httpx.post(f"{url}/v1/chat/completions", json=body).status_code == 401
        wrong = httpx.post(f"{url}/v1/chat/completions", json=body, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and "--api-key" in wrong.json()["error"]["message"]
        assert httpx.get(f"{url}/v1/models").status_code == 401
        right = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0)
        assert right.chat.completions.create(**body).usage.completion_tokens == 2
        assert httpx.get(f"{url}/health").status_code == 200  # probes need no key
        _until(lambda: "POST /v1/chat/completions 200" in (tmp_path / "serve.log").read_text(), "a request log line")
        assert "model=base prompt=" in (tmp_path / "serve.log").read_text()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def test_no_key_means_open_and_keys_are_read_from_the_option_first(server, monkeypatch):
    from kimi_lora_cli.serving.spec import api_key_from

    assert httpx.post(server[0] + "/v1/chat/completions", json=_chat(max_tokens=1)).status_code == 200
    monkeypatch.setenv("KIMI_LORA_API_KEY", "env")
    assert api_key_from(None) == "env" and api_key_from("flag") == "flag"
    monkeypatch.setenv("KIMI_LORA_API_KEY", "")
    assert api_key_from(None) is None


@pytest.mark.parametrize("args, message", [
    (["-a", "base=x"], "the name 'base' is reserved"),
    (["-a", "{missing}"], "no such adapter folder"),
    (["--max-batch-size", "0"], "--max-batch-size must be >= 1"),
    (["--device", "gpu7"], "is not a device"),
    (["--speech-tokenizer", "{missing}"], "--speech-tokenizer"),
])
def test_command_errors_are_one_line(cli, tiny_dir, tmp_path, args, message):
    args = [a.replace("{missing}", str(tmp_path / "missing")) for a in args]
    code, _, err = cli("serve", "-m", tiny_dir, "--port", "0", *args)
    assert code == 1 and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) <= 2


def test_without_the_extra_the_command_says_what_to_install(tiny_dir):
    code = ("import sys\nsys.modules['fastapi'] = None\nsys.argv = ['kimi-lora', 'serve', '-m', sys.argv[1]]\n"
            "from kimi_lora_cli.cli.app import main\nmain()")
    proc = subprocess.run([sys.executable, "-c", code, str(tiny_dir)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.startswith("Error")]
    assert lines and "pip install 'kimi-lora[serve]'" in lines[0] and "Traceback" not in proc.stderr


def test_help_imports_neither_torch_nor_the_web_stack():
    code = ("import sys\nsys.argv=['kimi-lora','serve','--help']\nfrom kimi_lora_cli.cli.app import main\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\nprint('@@', sorted(sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert "--max-loaded-adapters" in proc.stdout
    mods = proc.stdout.rsplit("@@", 1)[1]
    for heavy in ("'torch'", "'fastapi'", "'uvicorn'", "'starlette'"):
        assert heavy not in mods
