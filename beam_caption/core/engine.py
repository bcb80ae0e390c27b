"""The per-worker caption runtime: loop thread, model client from a factory, pools, byte budget.

One ``CaptionRuntime`` per worker process (held by Beam's ``Shared``) owns an asyncio event
loop in a background thread, a model client per model asked (``WorkerConfig.client_factory``,
by default ``VLMClient``) charging one --max_cost budget (core/budget.py), a thread pool for
storage reads (image files, cache entries) and one with a thread per core for image decoding
and encoding. ``submit`` starts one record and returns a future of its outcome. Image bytes
held by records in flight (source files, then request bodies) are bounded by a byte budget, so
memory does not grow with concurrency or image size.
The runtime knows nothing of Beam or of the output layout.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import logging
import os
import random
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from beam_caption.core.answer_checks import AnswerChecks
from beam_caption.core.api_keys import KeySource
from beam_caption.core.budget import CostBudget
from beam_caption.core.cache import RequestCache, request_digest
from beam_caption.core.client import ClientSettings, Completion, VLMClient
from beam_caption.core.errors import CaptionError, JobStopped, UsageError
from beam_caption.core.http_images import UrlGuard
from beam_caption.core.identity import settings_digest
from beam_caption.core.images import (
    ImageSettings,
    prepare_image_bytes,
    read_image_bytes,
    resolve_image_path,
)
from beam_caption.core.prompts import ModelRoute, PromptSpec
from beam_caption.core.records import IMAGE_BYTES, Outcome, failed_outcome, record_outcome
from beam_caption.core.request import (
    PromptSettings,
    RequestPlan,
    build_body,
    build_messages,
    image_paths,
    prompt_turns,
)
from beam_caption.core.stages import (
    batch_refusal,
    input_failed,
    is_staged,
    quality_meta,
    routes,
    score_checker,
)
from beam_caption.core.structured import answer_checker
from beam_caption.core.tokens import DEFAULT_COMPLETION_TOKENS, estimate_request_tokens

IO_THREADS_MAX = 64
IMAGE_BACKOFF_S = 0.5  # first wait before reading a record's images again
RECENT_SIZES = 64  # a record's source size is estimated as the largest of this many recent ones
FIRST_ESTIMATE_SHARE = 8  # before any read, a record is assumed to take 1/8 of the budget

_LOG = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class WorkerConfig:
    """Everything a worker needs to caption records; picklable and free of secrets."""

    client: ClientSettings
    prompts: PromptSettings
    images: ImageSettings
    image_root: str
    output_key: str = "caption"
    api_key: KeySource = KeySource()  # where workers find the key (never the key itself)
    cache_dir: str | None = None
    max_bytes_in_flight: int = 256 * 2**20
    image_timeout: float = 60.0
    image_retries: int = 3  # reads after the first for retryable image failures
    allow_private_urls: bool = False  # http(s) images may reach non-public addresses
    token_formula: str = "openai"  # how image tokens are counted (tokens.py)
    answer_checks: AnswerChecks = AnswerChecks()  # what a text answer must pass to be kept
    # (ClientSettings, api key, budget=the process's CostBudget, which every model's client
    # charges) -> client with ``async complete(body, tokens, params, check) -> Completion`` (see
    # VLMClient.complete) and ``async aclose()``; called on the runtime's loop. The seam tests
    # use for a fake model.
    client_factory: Callable[..., Any] = VLMClient

    @functools.cached_property
    def prompt_specs(self) -> tuple[PromptSpec, ...]:
        """The prompts each record is asked (``PromptSettings.prompt_specs``)."""
        return self.prompts.prompt_specs(self.output_key)

    @property
    def output_keys(self) -> list[str]:
        """The fields the answers are written to."""
        return [spec.output_key for spec in self.prompt_specs]

    @functools.cached_property
    def settings_digest(self) -> str:
        """Digest of every setting that shapes an answer (``caption_meta.fingerprint``)."""
        images = self.images
        prompts = dataclasses.asdict(self.prompts)
        if not prompts["specs"]:
            del prompts["specs"]  # the flags' one prompt: digests as before prompts files
        unstaged = PromptSpec("", "")
        for spec in prompts.get("specs", ()):  # stage fields left at their defaults: as before
            for name in _STAGE_FIELDS:
                if spec[name] == getattr(unstaged, name):
                    del spec[name]
        return settings_digest({
            "model": self.client.model, "params": self.client.request_params(),
            "prompts": prompts, "image_root": self.image_root,
            "images": {"max_side": images.max_side, "jpeg_quality": images.jpeg_quality,
                       "max_pixels": images.max_pixels},
            "output_key": self.output_key})


class Prepared(NamedTuple):
    """A record's requests, prepared but not sent (Batch API): (prompt name, body, estimated
    input tokens, most output tokens) each, or the failure that leaves it without."""

    requests: list[tuple[str, bytes, int, int]]
    failure: dict | None


class ByteBudget:
    """Bytes held by records in flight; ``acquire`` waits while the budget is spent.

    Waiters are served first come, first served, and only as many are woken as fit (no
    thundering herd of hundreds of waiters per release). A record larger than the whole budget
    still runs, alone. Used from one event loop.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0
        self._waiters: collections.deque[tuple[int, asyncio.Future]] = collections.deque()

    async def acquire(self, size: int) -> None:
        if not self._waiters and self._fits(size):
            self.used += size
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append((size, waiter))
        try:
            await waiter
        except asyncio.CancelledError:
            if not waiter.cancelled():
                self.used -= size  # granted as it was cancelled: give it back
            self._wake()
            raise

    async def resize(self, old: int, new: int) -> None:
        """Hold ``new`` bytes instead of ``old`` (without waiting: the bytes exist already)."""
        self.used += new - old
        if new < old:
            self._wake()

    def _fits(self, size: int) -> bool:
        return self.used == 0 or self.used + size <= self.limit

    def _wake(self) -> None:
        while self._waiters:
            size, waiter = self._waiters[0]
            if not waiter.done():  # a cancelled waiter is dropped, whatever its size
                if not self._fits(size):
                    return
                self.used += size
                waiter.set_result(None)
            self._waiters.popleft()


class CaptionRuntime:
    """Event loop thread + VLM client + image thread pool, shared by a worker's DoFns."""

    def __init__(self, config: WorkerConfig):
        self.config = config
        self._staged = is_staged(config.prompt_specs)
        self._batch_refusal = batch_refusal(config.prompt_specs)  # the launch refuses it too
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="beam-caption-loop")
        self._thread.start()
        self._io_pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=min(config.client.max_concurrency, IO_THREADS_MAX),
            thread_name_prefix="beam-caption-io")
        self._cpu_pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=usable_cores(), thread_name_prefix="beam-caption-image")
        api_key = _worker_api_key(config)
        # --max_cost: this process's share, charged by the clients of every model
        self._cost = CostBudget(config.client.max_cost, config.client.worker_processes)
        self._client = self.call(_make_client(config, config.client, api_key, self._cost))
        # A client per other model (a prompt's own, a re-caption's): its own connections and
        # rate limits (OpenAI's are per model), the same budget.
        self._clients: dict[ModelRoute | None, Any] = {None: self._client}
        for route in routes(config.prompt_specs):
            self._clients[route] = self.call(_make_client(
                config, route_settings(config.client, route), _route_key(route, api_key),
                self._cost))
        self._cache = RequestCache(config.cache_dir, self._run_io)
        self._budget = ByteBudget(config.max_bytes_in_flight)
        self._guard = UrlGuard(config.allow_private_urls)
        self._specs = config.prompt_specs
        self._params = {spec.name: {**config.client.request_params(), **spec.request_params()}
                        for spec in self._specs}
        self._checks = {spec.name: answer_checker(spec.wants_json, spec.schema,
                                                  config.answer_checks.checker())
                        for spec in self._specs}
        for spec in self._specs:
            if spec.judge_of:
                self._checks[spec.name] = score_checker(self._checks[spec.name])
        self._rng = random.Random()
        self._recent_sizes: collections.deque[int] = collections.deque(
            [min(config.images.max_bytes, config.max_bytes_in_flight // FIRST_ESTIMATE_SHARE)],
            maxlen=RECENT_SIZES)
        # Shared keeps the runtime for the life of the worker process; close it at exit.
        self.close = weakref.finalize(self, _shutdown, self._loop,
                                      tuple(self._clients.values()),
                                      (self._io_pool, self._cpu_pool))

    def _run_io(self, function, *args):
        return self._loop.run_in_executor(self._io_pool, function, *args)

    def stopped(self, stop: JobStopped) -> JobStopped:
        """Why the job stopped as the client says now (what a --max_cost stop spent, the answers
        that were in flight included), else ``stop`` as it was raised."""
        for client in self._clients.values():
            stopped = getattr(client, "stopped", None)
            if stopped and stopped():
                return stopped()
        return stop

    def count_spent_before(self, dollars: float) -> None:
        """What earlier runs spent (the reused captions' cost), for --max_cost."""
        self._loop.call_soon_threadsafe(self._cost.count_spent_before, dollars)

    def call(self, coroutine):
        """Run a coroutine on the runtime's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def submit(self, element: dict) -> concurrent.futures.Future:
        """Start captioning one keyed record; the future resolves to its ``Outcome`` (or raises
        JobStopped when the job must stop)."""
        return asyncio.run_coroutine_threadsafe(self._caption(element), self._loop)

    async def _caption(self, element: dict) -> Outcome:
        record, specs = element["record"], self._specs
        try:
            paths = self._paths(element)
            plans = [self._plan(record, paths, spec) for spec in specs]
            if all(isinstance(plan, CaptionError) for plan in plans):
                raise plans[0]  # type: ignore[misc]
            audit = _Audit()
            answers = await self._budgeted_answers(element, plans, audit)
        except CaptionError as error:
            return failed_outcome(element, error)
        except JobStopped:
            raise
        except Exception as exc:  # a bug must not lose the record: report it as a failure
            return failed_outcome(element, _internal_error(element["key"], exc))
        return record_outcome(element, specs, answers, model=self.config.client.model,
                              settings_digest=self.config.settings_digest,
                              finished_at=time.time(), quality=audit.quality,
                              tokens_by_model=audit.tokens_by_model(self.config.client.model))

    def _paths(self, element: dict) -> tuple[str, ...]:
        """The record's image paths; none when the element carries its images' bytes (a
        WebDataset sample, a table row with image bytes: core/inputs.py)."""
        if element.get("images"):
            return ()
        return image_paths(element["record"], self.config.prompts.image_key)

    def _plan(self, record: dict, paths: tuple[str, ...], spec: PromptSpec,
              answers: dict | None = None) -> RequestPlan | CaptionError | None:
        """What ``spec`` asks of the record, or why it cannot ask; None for a prompt that
        waits for other prompts' ``answers`` (planned when they come)."""
        if spec.inputs and answers is None:
            return None
        try:
            return RequestPlan(paths if spec.image else (),
                               prompt_turns(record, self.config.prompts, spec, answers))
        except CaptionError as error:
            return error

    async def _budgeted_answers(self, element: dict,
                                plans: list[RequestPlan | CaptionError | None],
                                audit: _Audit) -> list[Completion | CaptionError]:
        """Read and prepare the record's images once, then ask each prompt that has a plan,
        within the byte budget; each prompt's answer or error, in prompt order (with stages:
        each prompt once the answers it waits for have come)."""
        requests, held, images = await self._built_requests(element, plans)
        try:
            if self._staged:
                return await _Stages(self, element, plans, requests, images, audit).answers()
            return list(await asyncio.gather(*(
                self._answer(spec, request) if request is not None else _plan_error(plan)
                for spec, plan, request in zip(self._specs, plans, requests, strict=True))))
        finally:
            await self._budget.resize(held, 0)

    async def _built_requests(self, element: dict,
                              plans: list[RequestPlan | CaptionError | None]
                              ) -> tuple[list[_Request | None], int, _Images | None]:
        """The record's requests, the budget bytes they hold (the caller gives them back) and,
        with stages, the prepared images the later prompts are sent with.

        The record holds an estimate of its source size before reading (the largest of the
        recent ones), then the real size, then its request bodies' (and kept images') size.
        """
        held = max(self._recent_sizes)
        await self._budget.acquire(held)
        try:
            sources = (self._embedded(element["images"]) if element.get("images")
                       else await self._read_retrying(self._paths(element)))
            if IMAGE_BYTES in element:  # kept for the caption (records.keeping_images)
                element[IMAGE_BYTES] = sources
            size = sum(map(len, sources))
            self._recent_sizes.append(size)
            await self._budget.resize(held, size)
            held = size
            requests, images = await self._loop.run_in_executor(self._cpu_pool, self._requests,
                                                                plans, sources)
            del sources
            size = sum(len(request.body) for request in requests if request is not None)
            if images is not None:
                size += sum(map(len, images.urls))
            await self._budget.resize(held, size)
            return requests, size, images
        except BaseException:
            await self._budget.resize(held, 0)
            raise

    def submit_prepare(self, element: dict) -> concurrent.futures.Future:
        """Start preparing one keyed record's requests without sending them (the Batch API);
        the future resolves to its ``Prepared``."""
        return asyncio.run_coroutine_threadsafe(self._prepare(element), self._loop)

    async def _prepare(self, element: dict) -> Prepared:
        record, specs = element["record"], self._specs
        try:
            if self._batch_refusal:
                raise CaptionError("request", "not_in_batch", self._batch_refusal)
            paths = self._paths(element)
            plans = [self._plan(record, paths, spec) for spec in specs]
            for spec, plan in zip(specs, plans, strict=True):
                if isinstance(plan, CaptionError):  # sent later or never: the record fails now
                    return Prepared([], failed_outcome(
                        element, plan, spec.name if len(specs) > 1 else None).failure)
            requests, held, _ = await self._built_requests(element, plans)
            await self._budget.resize(held, 0)  # the bodies leave the runtime
        except CaptionError as error:
            return Prepared([], failed_outcome(element, error).failure)
        except Exception as exc:  # a bug must not lose the record: report it as a failure
            return Prepared([], failed_outcome(element,
                                               _internal_error(element["key"], exc)).failure)
        prepared = []
        for spec, request in zip(specs, requests, strict=True):
            assert request is not None  # every prompt has a plan here
            answer = self._params[spec.name].get("max_completion_tokens") or \
                DEFAULT_COMPLETION_TOKENS
            prepared.append((spec.name, request.body, request.tokens - answer, answer))
        return Prepared(prepared, None)

    async def _answer(self, spec: PromptSpec, request: _Request,
                      route: ModelRoute | None = None) -> Completion | CaptionError:
        """One prompt's answer (from the cache or the model: ``route``'s, None the job's), or
        why there is none."""
        check = self._checks[spec.name]
        client = self._clients[route]
        answer: Completion | CaptionError
        try:
            answer = await self._cache.complete(request.digest, lambda: client.complete(
                request.body, request.tokens, request.params, check))
        except CaptionError as error:
            answer = error
        except JobStopped:
            raise
        except Exception as exc:  # a bug must not lose the other prompts' answers
            return _internal_error(spec.name, exc)
        return answer

    def _embedded(self, images: list) -> list[bytes]:
        """Image bytes the element carries, checked as a file read would be."""
        max_bytes = self.config.images.max_bytes
        for number, data in enumerate(images):
            if not isinstance(data, bytes):
                raise CaptionError("read", "bad_image_field",
                                   f"image {number} is {type(data).__name__}, not bytes")
            if len(data) > max_bytes:
                raise CaptionError("image", "image_too_large",
                                   f"image {number} is {len(data)} bytes, over the limit of "
                                   f"{max_bytes} bytes")
        return list(images)

    async def _read_retrying(self, paths: tuple[str, ...]) -> list[bytes]:
        """The record's images, read again after a retryable failure (up to
        ``image_retries`` times, backoff with full jitter doubling from IMAGE_BACKOFF_S)."""
        attempt = 0
        while True:
            attempt += 1
            try:
                return await self._read_with_timeout(paths)
            except CaptionError as exc:
                if not exc.retryable or attempt > self.config.image_retries:
                    if attempt == 1:
                        raise
                    raise CaptionError(exc.stage, exc.type, f"{exc.message} (read {attempt} "
                                       "times)", exc.retryable) from None
                _LOG.debug("image read attempt %d failed, retrying: %s", attempt, exc)
                await asyncio.sleep(self._rng.uniform(0, IMAGE_BACKOFF_S * 2 ** (attempt - 1)))

    async def _read_with_timeout(self, paths: tuple[str, ...]) -> list[bytes]:
        timeout = self.config.image_timeout
        try:
            async with asyncio.timeout(timeout):  # cheaper on the loop than wait_for's task
                return await self._run_io(self._read_images, paths)
        except TimeoutError:
            raise CaptionError("image", "image_timeout",
                               f"reading the record's images took over {timeout:g} s "
                               "(--image_timeout)", retryable=True) from None

    def _read_images(self, paths: tuple[str, ...]) -> list[bytes]:
        """A record's image files, read one after the other: one pool task per record."""
        return read_record_images(paths, self.config, self._guard)

    def _requests(self, plans: list[RequestPlan | CaptionError | None],
                  sources: list[bytes]) -> tuple[list[_Request | None], _Images | None]:
        """Decode, resize and encode the images once; each planned prompt's request (None where
        the prompt has no plan yet), and with stages the images kept for later prompts."""
        prepared = [prepare_image_bytes(data, self.config.images) for data in sources]
        images = _Images([image.data_url for image in prepared],
                         [(image.width, image.height) for image in prepared])
        del prepared
        requests = [self.request(spec, plan, images) if isinstance(plan, RequestPlan) else None
                    for spec, plan in zip(self._specs, plans, strict=True)]
        return requests, images if self._staged else None

    def request(self, spec: PromptSpec, plan: RequestPlan, images: _Images,
                route: ModelRoute | None = None) -> _Request:
        """``spec``'s request of ``plan`` with the record's ``images`` (none for a prompt
        with ``image: false``), to ``route``'s model (None: the prompt's own, else the
        job's)."""
        prompts = self.config.prompts
        route = route or spec.route
        params = self._params[spec.name]
        if route is not None:
            params = {**params, **route.request_params()}
        urls, sizes = (images.urls, images.sizes) if spec.image else ([], [])
        body = build_body(route.model if route else self.config.client.model, params,
                          build_messages(plan, urls, spec.system_prompt or prompts.system_prompt,
                                         prompts.image_detail))
        tokens = estimate_request_tokens(
            len(body) - sum(map(len, urls)), sizes, params.get("max_completion_tokens"),
            self.config.token_formula, prompts.image_detail)
        return _Request(body, params, request_digest(body), tokens)

    async def off_loop(self, function, *args):
        """``function(*args)`` on the image thread pool (request bodies are large)."""
        return await self._loop.run_in_executor(self._cpu_pool, function, *args)

    async def hold(self, old: int, new: int) -> None:
        """Hold ``new`` budget bytes instead of ``old`` (a later stage's request body)."""
        await self._budget.resize(old, new)


class _Request(NamedTuple):
    """One prompt's request: body, the parameters it was built with, cache key, tokens."""

    body: bytes
    params: dict
    digest: str
    tokens: int


class _Images(NamedTuple):
    """A record's images as sent: data URLs and (width, height) each."""

    urls: list[str]
    sizes: list[tuple[int, int]]


_STAGE_FIELDS = ("route", "reasoning_effort", "image", "inputs", "judge_of", "threshold",
                 "recaption")


def route_settings(client: ClientSettings, route: ModelRoute) -> ClientSettings:
    """The client settings of ``route``: the job's, with its model, endpoint and prices."""
    input_price, output_price = route.prices(client.price_per_million_input_tokens,
                                             client.price_per_million_output_tokens)
    return dataclasses.replace(client, model=route.model, api_url=route.api_url or client.api_url,
                               price_per_million_input_tokens=input_price,
                               price_per_million_output_tokens=output_price)


def _route_key(route: ModelRoute, job_key: str | None) -> str | None:
    """The API key of ``route``'s endpoint: from its own source, else the job's."""
    if not (route.api_key_env or route.api_key_file):
        return job_key
    try:
        return KeySource(env=route.api_key_env, file=route.api_key_file).resolve()
    except UsageError as exc:
        raise JobStopped(f"a worker could not read the key of model {route.model!r}: {exc}") \
            from None


def _paid_tokens(answer: Completion | CaptionError) -> tuple[int, int]:
    """(prompt, completion) tokens an answer paid (a cached answer: none)."""
    if isinstance(answer, CaptionError):
        paid = answer.paid or {}
        return paid.get("prompt_tokens") or 0, paid.get("completion_tokens") or 0
    if answer.cached:
        return 0, 0
    return answer.prompt_tokens or 0, answer.completion_tokens or 0


class _Audit:
    """What a staged record's answers leave for ``caption_meta``: the judge's quality block and
    the tokens each model was paid."""

    def __init__(self) -> None:
        self.quality: dict | None = None
        self._tokens: dict[str, list[int]] = {}

    def paid(self, model: str, answer: Completion | CaptionError) -> None:
        prompt_tokens, completion_tokens = _paid_tokens(answer)
        if prompt_tokens or completion_tokens:
            counts = self._tokens.setdefault(model, [0, 0])
            counts[0] += prompt_tokens
            counts[1] += completion_tokens

    def tokens_by_model(self, job_model: str) -> dict | None:
        """Model -> paid tokens, when a model other than ``job_model`` was paid."""
        if set(self._tokens) <= {job_model}:
            return None
        return {model: {"prompt_tokens": prompt, "completion_tokens": completion}
                for model, (prompt, completion) in sorted(self._tokens.items())}


class _Stages:
    """One record's prompts asked in dependency order: each prompt starts once the answers it
    uses have come (prompts that wait for nothing start at once), a judged prompt's answer is
    final once its judge has scored it (and a low score has had it asked again)."""

    def __init__(self, runtime: CaptionRuntime, element: dict,
                 plans: list[RequestPlan | CaptionError | None],
                 requests: list[_Request | None], images: _Images | None, audit: _Audit):
        self._runtime, self._record = runtime, element["record"]
        self._paths = runtime._paths(element)
        self._images = images or _Images([], [])
        self._audit = audit
        specs = runtime._specs
        self._by_name = {spec.name: spec for spec in specs}
        self._start = {spec.name: (plan, request)
                       for spec, plan, request in zip(specs, plans, requests, strict=True)}
        loop = asyncio.get_running_loop()
        self._first: dict[str, asyncio.Future] = {spec.name: loop.create_future()
                                                  for spec in specs}
        self._final: dict[str, asyncio.Future] = {spec.name: loop.create_future()
                                                  for spec in specs}
        self._asked: dict[str, RequestPlan] = {}  # the plan each prompt was asked with
        self._judged = {spec.judge_of for spec in specs if spec.judge_of}

    async def answers(self) -> list[Completion | CaptionError]:
        specs = self._runtime._specs
        tasks = [asyncio.ensure_future(self._ask(spec)) for spec in specs]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            raise
        return [self._final[spec.name].result() for spec in specs]

    def _model(self, spec: PromptSpec, route: ModelRoute | None = None) -> str:
        route = route or spec.route
        return route.model if route else self._runtime.config.client.model

    async def _ask(self, spec: PromptSpec) -> None:
        answer = await self._answered(spec)
        self._first[spec.name].set_result(answer)
        if spec.judge_of:
            await self._judge(spec, answer)  # settles both prompts' final answers
        elif spec.name not in self._judged:
            self._final[spec.name].set_result(answer)

    async def _answered(self, spec: PromptSpec, inputs: dict | None = None,
                        route: ModelRoute | None = None) -> Completion | CaptionError:
        """``spec``'s answer: with ``inputs`` (prompt name -> answer) given, or once the answers
        it uses have come; to ``route``'s model (None: its own)."""
        plan, request = self._start[spec.name]
        if inputs is None and spec.inputs:
            inputs = {}
            for name in spec.needs:
                source = self._first if name == spec.judge_of else self._final
                given = await source[name]
                if isinstance(given, CaptionError):
                    return input_failed(spec, name)
                inputs[name] = given.caption
        if inputs is not None or route is not None:
            plan = self._runtime._plan(self._record, self._paths, spec, inputs) \
                if inputs is not None else self._asked[spec.name]
            request = None
        if isinstance(plan, CaptionError) or plan is None:
            return plan  # type: ignore[return-value]
        self._asked.setdefault(spec.name, plan)
        size = 0
        if request is None:
            request = await self._runtime.off_loop(self._runtime.request, spec, plan,
                                                   self._images, route)
            size = len(request.body)
            await self._runtime.hold(0, size)
        try:
            answer = await self._runtime._answer(spec, request, route or spec.route)
        finally:
            await self._runtime.hold(size, 0)
        self._audit.paid(self._model(spec, route), answer)
        return answer

    async def _judge(self, judge: PromptSpec, verdict: Completion | CaptionError) -> None:
        """Settle the judged prompt's final answer after ``verdict``: kept when it scores at
        least the threshold (or the judge failed), else asked again of the re-caption model,
        whose answer is judged in turn; the judge's final verdict replaces its first."""
        judged = self._by_name[judge.judge_of]  # type: ignore[index]
        first = self._first[judged.name].result()
        final, kept = self._final[judged.name], verdict
        try:
            if isinstance(verdict, CaptionError) or isinstance(first, CaptionError):
                final.set_result(first)
                return
            score = verdict.caption["score"]
            if judge.threshold is None or score >= judge.threshold:
                self._audit.quality = quality_meta(judge, score, self._model(judged))
                final.set_result(first)
                return
            route = judge.recaption
            second = await self._answered(judged, route=route)
            final.set_result(_merged(first, second))
            if isinstance(second, CaptionError):
                return
            inputs = {name: (second if name == judged.name else self._final[name].result()
                             ).caption for name in judge.needs}
            again = await self._answered(judge, inputs)
            kept = _merged(verdict, again)
            if not isinstance(again, CaptionError):
                self._audit.quality = quality_meta(
                    judge, again.caption["score"], self._model(judged, route),
                    {"first_answer": first.caption, "first_score": score,
                     "first_model": self._model(judged)})
        finally:
            if not final.done():
                final.set_result(first)
            self._final[judge.name].set_result(kept)


def _merged(first: Completion | CaptionError,
            second: Completion | CaptionError) -> Completion | CaptionError:
    """``second`` (the answer kept), counting what ``first`` took and paid too."""
    if isinstance(first, CaptionError):
        return second
    if isinstance(second, CaptionError):
        prompt_tokens, completion_tokens = _paid_tokens(second)
        paid = {"prompt_tokens": prompt_tokens + (0 if first.cached else first.prompt_tokens or 0),
                "completion_tokens": completion_tokens + (
                    0 if first.cached else first.completion_tokens or 0)}
        cached_tokens = (second.paid or {}).get("cached_tokens", 0) + (
            0 if first.cached else first.cached_tokens or 0)
        if cached_tokens:
            paid["cached_tokens"] = cached_tokens
        if first.usage_estimated or (second.paid or {}).get("estimated"):
            paid["estimated"] = True
        return CaptionError(second.stage, second.type, second.message, second.retryable,
                            second.attempts + first.attempts,
                            second.throttled_s + first.throttled_s,
                            paid if paid["prompt_tokens"] or paid["completion_tokens"] else None)

    def total(field: str) -> int | None:
        values = [getattr(first, field), getattr(second, field)]
        return None if all(v is None for v in values) else sum(v or 0 for v in values)

    return dataclasses.replace(
        second, prompt_tokens=total("prompt_tokens"),
        completion_tokens=total("completion_tokens"),
        reasoning_tokens=total("reasoning_tokens"), cached_tokens=total("cached_tokens"),
        attempts=first.attempts + second.attempts,
        latency_ms=round(first.latency_ms + second.latency_ms, 1),
        throttled_s=round(first.throttled_s + second.throttled_s, 3),
        cached=first.cached and second.cached,
        usage_estimated=first.usage_estimated or second.usage_estimated,
        rejected_answers=first.rejected_answers + second.rejected_answers)


async def _plan_error(plan) -> CaptionError:
    return plan


def _internal_error(what: str, exc: Exception) -> CaptionError:
    _LOG.error("internal error while captioning %s", what, exc_info=exc)
    return CaptionError("request", "internal_error", f"{type(exc).__name__}: {exc}")


def _worker_api_key(config: WorkerConfig) -> str | None:
    """The key as this worker finds it; JobStopped when the launcher had one and this worker has
    none (workers that do not share the launcher's environment), rather than 401 per record."""
    try:
        api_key = config.api_key.resolve()
    except UsageError as exc:
        raise JobStopped(f"a worker could not read the API key: {exc}") from None
    if config.api_key.required and api_key is None:
        raise JobStopped(f"a worker found no API key in {config.api_key.describe()}, where the "
                         "launcher found one; give workers the key with --api_key_secret or "
                         "--api_key_file (a file they can read) or set the variable in the "
                         "workers' environment")
    return api_key


def usable_cores() -> int:
    """Cores this process may run on (taskset, cpusets), not all the machine has."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def _shutdown(loop, clients, pools) -> None:
    """Close the clients' connections, stop the loop thread and the pools."""
    if loop.is_running():
        # Exiting anyway: on a timeout the sockets close with the process.
        with contextlib.suppress(concurrent.futures.TimeoutError, RuntimeError):
            asyncio.run_coroutine_threadsafe(_close_all(clients), loop).result(timeout=5)
        loop.call_soon_threadsafe(loop.stop)
    for pool in pools:
        pool.shutdown(wait=False, cancel_futures=True)


async def _close_all(clients) -> None:
    for client in clients:
        await client.aclose()


def read_record_images(paths: Sequence[str], config: WorkerConfig, guard: UrlGuard
                       ) -> list[bytes]:
    """The image files a record names, read one after the other as the caption step reads
    them (``--image_root``, the byte limit, the timeout, the URL guard); CaptionError for the
    first that cannot be."""
    return [read_image_bytes(resolve_image_path(path, config.image_root),
                             config.images.max_bytes, config.image_timeout, guard)
            for path in paths]


async def _make_client(config: WorkerConfig, settings: ClientSettings, api_key: str | None,
                       budget: CostBudget):
    """A client, made on the runtime's loop (an aiohttp session binds to the running loop),
    charging ``budget``."""
    return config.client_factory(settings, api_key, budget=budget)


