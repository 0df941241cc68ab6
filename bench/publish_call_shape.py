"""What the shape of a replacement Client.publish costs a call, in isolation (issue 12 trial fix).

Three shapes around an awaited no-op ``original`` and a stub span start, alternated round by round:
``fixed`` (nats-py's four parameters, forwarded positionally: main before the fix), ``any`` (``*args,
**kwargs``, read where the app put them and handed on the same way: sidetrace's now) and ``fast`` (the
same with a positional fast path, not taken). Prints the median and range of microseconds per call.

Usage: python bench/publish_call_shape.py [--rounds 7] [--calls 200000]
"""

import argparse
import asyncio
import statistics
import time


async def original(self, subject, payload=b"", reply="", headers=None):  # noqa: ANN001, ANN201
    """nats-py's publish, doing nothing."""
    return None


def start(subject, payload, headers):
    return None, None, {"traceparent": "x"} if headers is None else {**headers, "traceparent": "x"}, 0


def fixed():
    async def publish(self, subject, payload=b"", reply="", headers=None):
        try:
            span, d, new_headers, began = start(subject, payload, headers)
        except Exception:
            return await original(self, subject, payload, reply, headers)
        return await original(self, subject, payload, reply, new_headers)
    return publish


def any_arguments():
    async def publish(self, *args, **kwargs):
        count = len(args)
        try:
            subject = args[0] if count else kwargs["subject"]
            payload = args[1] if count > 1 else kwargs.get("payload", b"")
            headers = args[3] if count > 3 else kwargs.get("headers")
            len(payload)
            readable = isinstance(subject, str)
        except Exception:
            readable = False
        if not readable:
            return await original(self, *args, **kwargs)
        try:
            span, d, new_headers, began = start(subject, payload, headers)
        except Exception:
            return await original(self, *args, **kwargs)
        if count > 3:
            args = (*args[:3], new_headers, *args[4:])
        elif new_headers is not None or "headers" in kwargs:
            kwargs["headers"] = new_headers
        return await original(self, *args, **kwargs)
    return publish


def kw():
    async def publish(self, subject, payload=b"", reply="", headers=None, **kwargs):
        try:
            len(payload)
            readable = isinstance(subject, str)
        except Exception:
            readable = False
        if not readable:
            return await original(self, subject, payload, reply, headers, **kwargs)
        try:
            span, d, new_headers, began = start(subject, payload, headers)
        except Exception:
            return await original(self, subject, payload, reply, headers, **kwargs)
        return await original(self, subject, payload, reply, new_headers, **kwargs)
    return publish


def fast():
    async def publish(self, *args, **kwargs):
        if not kwargs and 1 < len(args) < 5 and isinstance(args[0], str):
            subject, payload, *rest = args
            try:
                len(payload)
            except TypeError:
                return await original(self, *args)
            reply = rest[0] if rest else ""
            headers = rest[1] if len(rest) > 1 else None
            span, d, new_headers, began = start(subject, payload, headers)
            if len(args) == 4:
                return await original(self, subject, payload, reply, new_headers)
            if rest:
                return await original(self, subject, payload, reply, headers=new_headers)
            return await original(self, subject, payload, headers=new_headers)
        return await original(self, *args, **kwargs)
    return publish


async def per_call(publish, calls: int) -> float:
    began = time.perf_counter()
    for _ in range(calls):
        await publish(None, "subj", b"x")
    return (time.perf_counter() - began) / calls * 1e6


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=200_000)
    args = parser.parse_args()
    shapes = {"fixed": fixed(), "any": any_arguments(), "fast": fast()}
    results: dict[str, list[float]] = {name: [] for name in shapes}
    for _ in range(args.rounds):
        for name, publish in shapes.items():
            results[name].append(await per_call(publish, args.calls))
    for name, values in results.items():
        print(f"{name:6} {statistics.median(values):.3f} us ({min(values):.3f}-{max(values):.3f})")


if __name__ == "__main__":
    asyncio.run(main())
