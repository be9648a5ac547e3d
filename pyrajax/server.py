"""An OpenAI-compatible HTTP server over the engine: `pyrajax serve`.

One thread owns the engine and every JAX call (`EngineThread`); FastAPI handlers on uvicorn's event loop talk to
it through one asyncio queue per request, fed with `loop.call_soon_threadsafe`. Endpoints: `/v1/completions`,
`/v1/chat/completions` (the tokenizer's chat template, its protect mask), `/v1/models`, `/health` and `/metrics`
(Prometheus text). Streams are server-sent events in the OpenAI chunk format. A client that goes away cancels its
request (its slot is free within two decode chunks); SIGTERM closes the listening socket, lets running requests
finish for `drain_timeout` seconds (uvicorn's graceful shutdown), then cancels the rest and exits.
"""
from __future__ import annotations

import asyncio
import json
import logging
import secrets
import threading
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from pyrajax import validate
from pyrajax.cache import PyramidConfig
from pyrajax.engine import Engine, QueueFull, Request, Stream
from pyrajax.prompts import chat_prompt

log = logging.getLogger("pyrajax.server")


class EngineThread:
    """Runs `engine.step` whenever there is work; sleeps on an event otherwise. An exception inside a step fails
    every request in flight (their streams end with an error chunk) and the engine starts over empty."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._wake = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="pyrajax-engine", daemon=True)

    def start(self):
        self._thread.start()

    def wake(self):
        self._wake.set()

    def stop(self, timeout: float = 30.0):
        self._stop = True
        self._wake.set()
        self._thread.join(timeout)

    def _run(self):
        while not self._stop:
            if not self.engine.busy:
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            try:
                self.engine.step()
            except Exception as e:  # noqa: BLE001  -- reported to every client in flight, then carry on
                log.exception("engine step failed")
                self.engine.fail(f"{type(e).__name__}: {e}")


# ---------------------------------------------------------------------------------------------------------
# Errors and request fields

class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _field(body: dict, name: str, kind, default=None, *, check=None, why: str = ""):
    """body[name] (or `default` when absent or null), which must be of `kind` and pass `check`."""
    value = body.get(name)
    if value is None:
        return default
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool or (check and not check(value)):
        raise APIError(400, f"'{name}' must be {why or kind.__name__}, got {value!r}", param=name)
    return value


class Detokenizer:
    """Text of a growing token list, released only up to where it is final: not inside an incomplete UTF-8
    character, and never where a stop string may still begin. `stop_at` is where a stop string was found."""

    def __init__(self, tokenizer, stops: list[str]):
        self.tokenizer, self.stops = tokenizer, stops
        self.tokens: list[int] = []
        self.text, self.sent = "", 0
        self.stop_at: int | None = None

    def add(self, tokens: list[int], final: bool) -> str:
        self.tokens += tokens
        if self.tokenizer is not None:
            self.text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        for s in self.stops:
            i = self.text.find(s, max(0, self.sent - len(s)))
            if i >= 0 and (self.stop_at is None or i < self.stop_at):
                self.stop_at = i
        end = len(self.text) if self.stop_at is None else self.stop_at
        if not final and self.stop_at is None:
            end -= max((len(s) - 1 for s in self.stops), default=0)
            while end > self.sent and self.text[end - 1] == "\ufffd":  # half a character: wait for the rest
                end -= 1
        delta = self.text[self.sent:max(end, self.sent)]
        self.sent += len(delta)
        return delta


# ---------------------------------------------------------------------------------------------------------
# Metrics

class Histogram:
    def __init__(self, name: str, help: str, buckets: tuple[float, ...]):
        self.name, self.help, self.buckets = name, help, buckets
        self.counts, self.sum, self.n = [0] * len(buckets), 0.0, 0

    def observe(self, x: float):
        self.n += 1
        self.sum += x
        for i, b in enumerate(self.buckets):
            if x <= b:
                self.counts[i] += 1

    def text(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        out += [f'{self.name}_bucket{{le="{b}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        return out + [f'{self.name}_bucket{{le="+Inf"}} {self.n}', f"{self.name}_sum {self.sum}",
                      f"{self.name}_count {self.n}"]


LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96)


# ---------------------------------------------------------------------------------------------------------
# The app

def create_app(engine: Engine, tokenizer, model_name: str, policies: dict[str, PyramidConfig], *,
               drain_timeout: float = 30.0) -> FastAPI:
    """The FastAPI app. `policies`: the cache presets a request may name in its `cache` field (the first is the
    default); all run in the engine's programs."""
    worker = EngineThread(engine)
    default_policy = next(iter(policies))
    stats = dict(prompt_tokens=0, finished={})
    ttft = Histogram("pyrajax_time_to_first_token_seconds", "Time from arrival to the first token.",
                     LATENCY_BUCKETS)
    tpot = Histogram("pyrajax_time_per_output_token_seconds", "Time per output token after the first.",
                     LATENCY_BUCKETS)
    e2e = Histogram("pyrajax_e2e_request_latency_seconds", "Time from arrival to the last token.",
                    LATENCY_BUCKETS)
    created = int(time.time())

    async def lifespan(app):
        worker.start()
        yield
        worker.stop()

    app = FastAPI(title="pyrajax", lifespan=lifespan)
    app.state.engine, app.state.worker = engine, worker

    @app.exception_handler(APIError)
    async def api_error(_, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(json.JSONDecodeError)
    async def bad_json(_, e):
        return JSONResponse(APIError(400, f"the body is not valid JSON: {e}").body(), status_code=400)

    # ----------------------------------------------------------------------------- parsing
    async def read_body(http: HTTPRequest) -> dict:
        try:
            body = json.loads(await http.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise APIError(400, "the body must be a JSON object")
        model = body.get("model")
        if model is not None and model != model_name:
            raise APIError(404, f"the model '{model}' does not exist; this server serves '{model_name}'",
                           param="model", code="model_not_found", type="NotFoundError")
        if _field(body, "n", int, 1) != 1:
            raise APIError(400, "only n=1 is supported", param="n")
        if _field(body, "best_of", int, 1) != 1:
            raise APIError(400, "only best_of=1 is supported", param="best_of")
        if body.get("echo"):
            raise APIError(400, "echo is not supported", param="echo")
        if body.get("logprobs") not in (None, False, 0):
            raise APIError(400, "logprobs are not supported", param="logprobs")
        return body

    def settings(body: dict, ids: list[int], protect, max_default: int, max_field: str) -> tuple[Request, list]:
        name = _field(body, "cache", str, default_policy)
        if name not in policies:
            raise APIError(400, f"'cache' must be one of {', '.join(policies)}, got {name!r}", param="cache")
        stop = body.get("stop")
        stop = [stop] if isinstance(stop, (str, int)) and not isinstance(stop, bool) else stop or []
        if not isinstance(stop, list) or not all(isinstance(s, (str, int)) and not isinstance(s, bool) for s in stop):
            raise APIError(400, "'stop' must be a string or a list of strings and token ids", param="stop")
        stop_ids = [s for s in stop if isinstance(s, int)]
        stop_ids += _field(body, "stop_token_ids", list, [], check=lambda x: all(type(i) is int for i in x),
                           why="a list of token ids")
        if not _field(body, "ignore_eos", bool, False):
            stop_ids += list(engine.cfg.eos_ids)
        strings = [s for s in stop if isinstance(s, str) and s]
        if strings and tokenizer is None:
            raise APIError(400, "stop strings need a tokenizer; this server has none (use token ids)", param="stop")
        seed = _field(body, "seed", int, None, check=lambda x: 0 <= x < 2**32, why="an int in [0, 2**32)")
        top_k = _field(body, "top_k", int, 0, check=lambda x: x >= -1, why="an int >= 0 (0 or -1 = off)")
        vocab = engine.cfg.vocab_size  # the vocabulary bounds in the Python API's words (pyrajax.validate)
        for param, check in (("top_k", lambda: validate.sampling(0.0, max(top_k, 0), 1.0, vocab)),
                             ("stop", lambda: validate.stop_ids(stop_ids, vocab))):
            try:
                check()
            except ValueError as e:
                raise APIError(400, str(e), param=param) from None
        request = Request(
            ids=ids, protect=protect, policy=policies[name],
            max_new=_field(body, max_field, int, max_default, check=lambda x: x >= 1, why="a positive int"),
            temperature=_field(body, "temperature", float, 1.0, check=lambda x: 0 <= x <= 100, why="in [0, 100]"),
            top_p=_field(body, "top_p", float, 1.0, check=lambda x: 0 < x <= 1, why="in (0, 1]"),
            top_k=max(top_k, 0), seed=secrets.randbits(32) if seed is None else seed,
            stop_ids=tuple(dict.fromkeys(stop_ids)))
        return request, strings

    def submit(request: Request, arrived: float) -> tuple[Stream, asyncio.Queue]:
        if worker._stop:
            raise APIError(503, "the server is shutting down", type="ServiceUnavailableError")
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()

        def on_event(stream, tokens, finish):  # engine thread -> this request's queue
            try:
                loop.call_soon_threadsafe(queue.put_nowait, (tokens, finish))
            except RuntimeError:  # the event loop is gone (shutdown)
                pass

        try:
            stream = engine.prepare(request, on_event)
        except ValueError as e:
            code = "context_length_exceeded" if "maximum context" in str(e) else None
            raise APIError(400, str(e), param="prompt" if code else None, code=code) from None
        stream.submitted = arrived
        try:
            engine.submit(stream)
        except QueueFull as e:
            raise APIError(503, f"the server is busy: {e}; retry later", type="ServiceUnavailableError",
                           headers={"Retry-After": "1"}) from None
        stats["prompt_tokens"] += len(stream.request.ids)
        worker.wake()
        return stream, queue

    def record(stream: Stream, finish: str):
        stats["finished"][finish] = stats["finished"].get(finish, 0) + 1
        now = time.perf_counter()
        if stream.first_token_at is not None:
            ttft.observe(stream.first_token_at - stream.submitted)
            e2e.observe(now - stream.submitted)
            if len(stream.tokens) > 1:
                tpot.observe((now - stream.first_token_at) / (len(stream.tokens) - 1))

    async def events(stream: Stream, queue: asyncio.Queue, detok: Detokenizer):
        """(text delta, token ids, finish reason or None) as they come. A request abandoned before its end (the
        client gone: this generator closed or cancelled) is cancelled in the engine."""
        finish = None
        try:
            while finish is None:
                tokens, finish = await queue.get()
                if finish == "error":
                    raise RuntimeError(stream.error)
                delta = detok.add(tokens, final=finish is not None)
                if finish is None and detok.stop_at is not None:  # a stop string: end it here
                    finish = "stop"
                yield delta, tokens, finish
        finally:
            if stream.finish is None:  # still running in the engine (a stop string, or nobody listening)
                engine.cancel(stream, finish or "cancelled")
                worker.wake()
            record(stream, finish or "cancelled")

    # ----------------------------------------------------------------------------- responses
    def usage(stream: Stream, n_out: int) -> dict:
        n_in = len(stream.request.ids)
        return {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}

    def finish_reason(finish: str) -> str:
        return "length" if finish == "length" else "stop"

    async def respond(http: HTTPRequest, body: dict, stream: Stream, queue, strings, chat: bool):
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        obj = "chat.completion" if chat else "text_completion"
        now = int(time.time())
        detok = Detokenizer(tokenizer, strings)
        head = dict(id=rid, object=obj + (".chunk" if chat else ""), created=now, model=model_name)

        def choice(delta: str, tokens, finish):
            c = {"index": 0, "finish_reason": finish and finish_reason(finish), "token_ids": tokens}
            if chat:
                c["delta"] = {"content": delta} if delta or finish is None else {}
            else:
                c.update(text=delta, logprobs=None)
            return c

        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

            async def sse():
                n_out = 0
                if chat:
                    yield _sse({**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                     "finish_reason": None}]})
                try:
                    async for delta, tokens, finish in events(stream, queue, detok):
                        n_out += len(tokens)
                        if delta or tokens or finish:
                            yield _sse({**head, "choices": [choice(delta, tokens, finish)]})
                except RuntimeError as e:  # the engine failed mid-stream: a final error chunk
                    yield _sse(APIError(500, str(e), type="InternalServerError").body())
                else:
                    if include_usage:
                        yield _sse({**head, "choices": [], "usage": usage(stream, n_out)})
                yield "data: [DONE]\n\n"

            return StreamingResponse(sse(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        async def collect():
            text, token_ids, finish = [], [], None
            async for delta, tokens, finish in events(stream, queue, detok):
                text.append(delta)
                token_ids += tokens
            return "".join(text), token_ids, finish

        task = asyncio.ensure_future(collect())
        while not task.done():  # a buffered response sends nothing until done: watch for the client leaving
            await asyncio.wait([task], timeout=0.5)
            if not task.done() and await http.is_disconnected():
                task.cancel()  # the generator's `finally` cancels the request in the engine
                return PlainTextResponse("", status_code=499)
        try:
            out, token_ids, finish = task.result()
        except RuntimeError as e:
            raise APIError(500, str(e), type="InternalServerError") from None
        result = {"index": 0, "finish_reason": finish_reason(finish), "token_ids": token_ids}
        result.update({"message": {"role": "assistant", "content": out}} if chat else {"text": out, "logprobs": None})
        return JSONResponse({**head, "object": obj, "choices": [result], "usage": usage(stream, len(token_ids))})

    # ----------------------------------------------------------------------------- endpoints
    @app.post("/v1/completions")
    async def completions(http: HTTPRequest):
        arrived = time.perf_counter()
        body = await read_body(http)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str):
            if tokenizer is None:
                raise APIError(400, "this server has no tokenizer: send the prompt as token ids", param="prompt")
            ids = tokenizer.encode(prompt)
        elif isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):
            ids = prompt
        else:
            raise APIError(400, "'prompt' must be a non-empty string or list of token ids (n=1, one prompt)",
                           param="prompt")
        request, strings = settings(body, ids, None, 16, "max_tokens")
        stream, queue = submit(request, arrived)
        return await respond(http, body, stream, queue, strings, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HTTPRequest):
        arrived = time.perf_counter()
        body = await read_body(http)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise APIError(400, "'messages' must be a non-empty list of {role, content} objects", param="messages")
        conv = []
        for m in messages:
            content = m.get("content")
            if isinstance(content, list):  # content parts: only text is understood
                if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                    raise APIError(400, "only text content parts are supported", param="messages")
                content = "".join(p.get("text", "") for p in content)
            conv.append({"role": m.get("role"), "content": content})
        if tokenizer is None:
            raise APIError(400, "this server has no tokenizer, so no chat template", param="messages")
        name = body.get("cache") if isinstance(body.get("cache"), str) else default_policy
        last_turn = policies.get(name, policies[default_policy]).protect_last_turn
        try:
            ids, protect = chat_prompt(tokenizer, conv, last_turn)
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None
        max_field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        request, strings = settings(body, ids, protect, engine.plan.new_bucket, max_field)
        stream, queue = submit(request, arrived)
        return await respond(http, body, stream, queue, strings, chat=True)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "pyrajax", "root": model_name, "parent": None,
                                            "max_model_len": engine.max_prompt + engine.plan.new_bucket}]}

    @app.get("/health")
    async def health():
        if worker._stop or not worker._thread.is_alive():
            return JSONResponse({"status": "stopped"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        m = engine.metrics()
        lines = []
        for name, kind, help, value in [
            ("pyrajax_requests_running", "gauge", "Requests holding a slot.", m["running"]),
            ("pyrajax_requests_waiting", "gauge", "Requests waiting for a slot.", m["waiting"]),
            ("pyrajax_slots", "gauge", "Decode slots.", m["slots"]),
            ("pyrajax_generation_tokens_total", "counter", "Tokens generated.", m["generated_tokens"]),
            ("pyrajax_prompt_tokens_total", "counter", "Prompt tokens admitted.", stats["prompt_tokens"]),
            ("pyrajax_kv_cache_allocated_bytes", "gauge", "Bytes of the K and V arrays of every slot.",
             m["kv_bytes"]),
            ("pyrajax_kv_cache_live_bytes", "gauge", "Bytes of K and V that occupied slots hold.",
             m["live_kv_bytes"])]:
            lines += [f"# HELP {name} {help}", f"# TYPE {name} {kind}", f"{name} {value}"]
        lines += ["# HELP pyrajax_requests_finished_total Requests finished, by reason.",
                  "# TYPE pyrajax_requests_finished_total counter"]
        lines += [f'pyrajax_requests_finished_total{{reason="{k}"}} {v}' for k, v in stats["finished"].items()]
        for h in (ttft, tpot, e2e):
            lines += h.text()
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    return app


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def serve(app: FastAPI, host: str, port: int, drain_timeout: float) -> None:
    """Run uvicorn until SIGTERM / SIGINT; running requests get `drain_timeout` seconds to finish."""
    import signal

    import uvicorn
    # uvicorn drains on SIGTERM, then raises the signal again under the handler it found. SIGTERM is how
    # orchestrators ask for a drain: found a no-op handler, the process exits 0 once drained.
    signal.signal(signal.SIGTERM, lambda *_: None)
    uvicorn.run(app, host=host, port=port, timeout_graceful_shutdown=drain_timeout, log_level="info")
    log.info("drained and stopped")


# ---------------------------------------------------------------------------------------------------------
# `pyrajax serve`

def build(args):
    """(engine, tokenizer, model name, policies) from the command line's arguments."""
    import jax
    import jax.numpy as jnp

    import pyrajax
    from pyrajax.engine import make_engine, resolve_policies
    from pyrajax.generate import get_tokenizer

    on_gpu = jax.default_backend() == "gpu"
    dtype = {"auto": jnp.bfloat16 if on_gpu else jnp.float32, "bfloat16": jnp.bfloat16,
             "float32": jnp.float32}[args.dtype]
    mesh = pyrajax.make_mesh(tp=args.tp) if args.tp > 1 else None  # the engine runs over the params' mesh
    if args.random:
        from pyrajax import sharding
        cfg = pyrajax.preset(args.random)
        params = sharding.random_params(jax.random.key(args.seed), cfg, mesh, dtype=dtype)
        name = f"random-{args.random}"
        tokenizer = get_tokenizer(pyrajax.GenerationConfig(model=cfg, tokenizer=args.tokenizer)) if args.tokenizer else None
    else:
        from pathlib import Path

        from checkpoints_convert.embedded import default_model_dir
        path = Path(args.checkpoint) if args.checkpoint else default_model_dir()
        params, cfg = pyrajax.load(path, dtype=dtype, mesh=mesh)
        name = path.name
        tokenizer = get_tokenizer(cfg)
    policies = resolve_policies(args.cache)
    engine = make_engine(params, cfg, list(policies.values()), slots=args.slots, max_prompt=args.max_prompt,
                         max_new=args.max_new, min_bucket=args.min_bucket, steps=args.steps, max_protected=args.max_protected,
                         max_waiting=args.max_waiting, prefill_tokens=args.prefill_tokens,
                         max_prefill_batch=args.max_prefill_batch, impl=args.impl)
    return engine, tokenizer, args.served_model_name or name, policies


def main(argv: list[str] | None = None) -> int:
    import argparse
    ap = argparse.ArgumentParser(prog="pyrajax serve", description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", help="a converted checkpoint (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--random", metavar="PRESET", help="random weights of a model preset instead (benchmarks)")
    ap.add_argument("--tokenizer", help="with --random: a tokenizer directory (default: none, token ids only)")
    ap.add_argument("--seed", type=int, default=0, help="with --random: the weights' seed")
    ap.add_argument("--cache", nargs="+", default=["full"],
                    help="cache policy presets; the first is the default, a request may name another in `cache`")
    ap.add_argument("--slots", type=int, default=8, help="requests decoded at once")
    ap.add_argument("--max-prompt", type=int, default=2048, help="longest prompt accepted (tokens)")
    ap.add_argument("--max-new", type=int, default=512, help="most tokens generated per request")
    ap.add_argument("--max-protected", type=int, default=128,
                    help="protected prompt tokens (a chat's template, system prompt, last turn) the caches hold")
    ap.add_argument("--min-bucket", type=validate.cli_int(1), default=16,
                    help="smallest prompt-length bucket: shorter prompts are padded to it (fewer programs compile)")
    ap.add_argument("--steps", type=int, default=8, help="decode steps per compiled call")
    ap.add_argument("--max-waiting", type=int, default=256, help="queued requests before 503")
    ap.add_argument("--prefill-tokens", type=int, default=4096, help="prompt tokens prefilled per round")
    ap.add_argument("--max-prefill-batch", type=int, default=4, help="arrivals of one bucket prefilled together")
    ap.add_argument("--warmup", action="store_true", help="compile every program before serving")
    ap.add_argument("--impl", default="auto", choices=["auto", "pallas", "xla"])
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel devices (the model split over them)")
    ap.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    ap.add_argument("--served-model-name")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--drain-timeout", type=float, default=30.0, help="seconds running requests get on SIGTERM")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        engine, tokenizer, name, policies = build(args)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"pyrajax serve: error: {e}", flush=True)
        return 2
    kv = engine.metrics()["kv_bytes"]
    log.info("serving %s: %d slots, prompts <= %d + %d new tokens, caches %s, KV %.1f MiB, capacities %s",
             name, engine.slots, engine.max_prompt, engine.plan.new_bucket, ", ".join(policies), kv / 2**20,
             list(engine.plan.capacity))
    if args.warmup:
        t = time.perf_counter()
        engine.warmup()
        log.info("compiled every program in %.0f s", time.perf_counter() - t)
    serve(create_app(engine, tokenizer, name, policies, drain_timeout=args.drain_timeout), args.host, args.port,
          args.drain_timeout)
    return 0
