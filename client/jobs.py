"""`triton-tts client job submit|status|wait|download|list|cancel`: long-form jobs on a triton-tts gateway.

Standard library only (urllib), so `pip install 'triton-tts[client]'` suffices. The gateway is
``--gateway`` (or ``TTS_GATEWAY_URL``, default http://127.0.0.1:8080); the key is ``--api-key`` (or
``TTS_GATEWAY_API_KEY``), sent as a bearer token. Errors are the gateway's OpenAI-style error messages, printed as
one line (exit status 2).

`wait` polls the job once a second and shows its progress and ETA; it exits 0 when the job succeeded and 1 when it
failed or was cancelled. `download` writes to ``OUT.part`` first and resumes an interrupted download with a Range
request, then renames the file into place.
"""

from __future__ import annotations

import argparse
import json
import mimetypes
import os
import secrets
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from engine_ref.errors import InputError, TTSError

__all__ = ["register", "JobClient", "JobAPIError", "DEFAULT_GATEWAY"]

DEFAULT_GATEWAY = "http://127.0.0.1:8080"
_TERMINAL = ("succeeded", "failed", "cancelled")
_PARAM_FLAGS = {  # flag -> (field, type)
    "--temperature": ("temperature", float), "--top-p": ("top_p", float), "--top-k": ("top_k", int),
    "--repetition-penalty": ("repetition_penalty", float), "--num-beams": ("num_beams", int),
    "--max-mel-tokens": ("max_mel_tokens", int), "--seed": ("seed", int),
    "--max-text-tokens-per-segment": ("max_text_tokens_per_segment", int),
}


class JobAPIError(TTSError):
    """The gateway refused a request (its error message), or could not be reached."""

    def __init__(self, problem: str, fix: str | None = None, status: int | None = None):
        super().__init__(problem, fix)
        self.status = status


class JobClient:
    """The job endpoints of one gateway."""

    def __init__(self, base_url: str = DEFAULT_GATEWAY, api_key: str | None = None, timeout_s: float = 60.0):
        if "://" not in base_url:
            base_url = "http://" + base_url
        self.base = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout_s = timeout_s

    def _request(self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None):
        req = urllib.request.Request(self.base + path, data=body, method=method, headers=dict(headers or {}))
        if self.api_key:
            req.add_header("Authorization", f"Bearer {self.api_key}")
        try:
            return urllib.request.urlopen(req, timeout=self.timeout_s)
        except urllib.error.HTTPError as exc:
            raise _api_error(exc) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise JobAPIError(f"cannot reach the gateway at {self.base} ({reason})",
                              "start it (triton-tts gateway) or pass --gateway URL") from None

    def _json(self, method: str, path: str, body: bytes | None = None,
              headers: dict[str, str] | None = None) -> dict[str, Any]:
        with self._request(method, path, body, headers) as resp:
            return json.loads(resp.read().decode("utf-8"))

    def submit(self, voice: str, fmt: str = "mp3", file: str | os.PathLike | None = None, text: str | None = None,
               **fields: Any) -> dict[str, Any]:
        """A new job from a .txt/.epub file or a text; `fields`: title, author, bitrate, generation parameters."""
        form = {"voice": voice, "format": fmt, **{k: v for k, v in fields.items() if v is not None}}
        if (file is None) == (text is None):
            raise InputError("pass either a file or a text", "use --file BOOK.epub|BOOK.txt or --text/--text-file")
        if text is not None:
            body = json.dumps({"input": text, **form}).encode("utf-8")
            return self._json("POST", "/v1/audio/jobs", body, {"Content-Type": "application/json"})
        path = Path(file)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise InputError(f"cannot read {str(path)!r} ({exc.strerror or exc})", "check the path") from None
        body, ctype = _multipart(form, "file", path.name, data)
        return self._json("POST", "/v1/audio/jobs", body, {"Content-Type": ctype})

    def get(self, job_id: str) -> dict[str, Any]:
        return self._json("GET", f"/v1/audio/jobs/{urllib.parse.quote(job_id, safe='')}")

    def list(self, limit: int = 20) -> list[dict[str, Any]]:
        return self._json("GET", f"/v1/audio/jobs?limit={int(limit)}")["data"]

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._json("DELETE", f"/v1/audio/jobs/{urllib.parse.quote(job_id, safe='')}")

    def wait(self, job_id: str, timeout_s: float | None = None, poll_s: float = 1.0,
             on_progress: Any = None) -> dict[str, Any]:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            job = self.get(job_id)
            if on_progress is not None:
                on_progress(job)
            if job["state"] in _TERMINAL:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise JobAPIError(f"job {job_id} is still {job['state']} after {timeout_s:g} s",
                                  "wait longer (--timeout) or check it later with `client job status`")
            time.sleep(poll_s)

    def download(self, job_id: str, out: str | os.PathLike) -> Path:
        """The result into `out` (resuming OUT.part with a Range request when a previous download stopped)."""
        out = Path(out)
        part = out.with_name(out.name + ".part")
        have = part.stat().st_size if part.is_file() else 0
        headers = {"Range": f"bytes={have}-"} if have else {}
        try:
            resp = self._request("GET", f"/v1/audio/jobs/{urllib.parse.quote(job_id, safe='')}/result",
                                 headers=headers)
        except JobAPIError as exc:
            if exc.status == 416:  # the .part is already whole (or stale): start over
                part.unlink(missing_ok=True)
                return self.download(job_id, out)
            raise
        with resp:
            mode = "ab" if have and resp.status == 206 else "wb"
            with open(part, mode) as fh:
                while True:
                    block = resp.read(1 << 16)
                    if not block:
                        break
                    fh.write(block)
        os.replace(part, out)
        return out


def _api_error(exc: urllib.error.HTTPError) -> JobAPIError:
    try:
        body = json.loads(exc.read().decode("utf-8"))
        message = body["error"]["message"]
    except Exception:  # noqa: BLE001 - not the gateway's JSON (a proxy's page)
        message = f"HTTP {exc.code} {exc.reason}"
    problem, sep, fix = str(message).partition(". Fix: ")
    return JobAPIError(f"the gateway answered {exc.code}: {problem}", fix if sep else None, status=exc.code)


def _multipart(fields: dict[str, Any], file_field: str, filename: str, data: bytes) -> tuple[bytes, str]:
    boundary = "----triton-tts-" + secrets.token_hex(12)
    lines: list[bytes] = []
    for key, value in fields.items():
        lines += [f"--{boundary}".encode(), f'Content-Disposition: form-data; name="{key}"'.encode(), b"",
                  str(value).encode("utf-8")]
    safe_name = filename.replace('"', "_").replace("\r", "_").replace("\n", "_")
    ctype = mimetypes.guess_type(filename)[0] or ("application/epub+zip" if filename.lower().endswith(".epub")
                                                  else "application/octet-stream")
    lines += [f"--{boundary}".encode(),
              f'Content-Disposition: form-data; name="{file_field}"; filename="{safe_name}"'.encode(),
              f"Content-Type: {ctype}".encode(), b"", data, f"--{boundary}--".encode(), b""]
    return b"\r\n".join(lines), f"multipart/form-data; boundary={boundary}"


# --- the command line -------------------------------------------------------------------------------------------

def register(client_sub: argparse._SubParsersAction) -> None:
    """Add `job ...` under `triton-tts client`."""
    p = client_sub.add_parser("job", help="long-form jobs on a gateway: submit a txt/epub, follow it, download it")
    sub = p.add_subparsers(dest="job_command", metavar="SUBCOMMAND")
    sub.required = True

    s = sub.add_parser("submit", help="submit a .txt/.epub file or a text as a background job")
    _gateway_args(s)
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--file", help="the book: .epub (chapters from its table of contents) or .txt (from headings)")
    src.add_argument("--text", help="the text itself")
    src.add_argument("--text-file", help="a UTF-8 text file sent as text (like --file for .txt)")
    s.add_argument("--voice", required=True, help="a stored voice's name or id (POST /v1/audio/voices)")
    s.add_argument("--format", default="m4b", choices=("m4b", "mp3", "opus", "flac", "wav"),
                   help="the result's format (default m4b: AAC with chapter markers)")
    s.add_argument("--title", help="the title tag (default: the book's)")
    s.add_argument("--author", help="the author tag (default: the book's)")
    s.add_argument("--bitrate", help="for m4b/mp3/opus, e.g. 64k")
    for flag, (_, kind) in _PARAM_FLAGS.items():
        s.add_argument(flag, type=kind, help=argparse.SUPPRESS if flag == "--max-text-tokens-per-segment" else None)
    s.add_argument("--greedy", action="store_true", help="no sampling, one beam (deterministic)")
    s.add_argument("--wait", action="store_true", help="wait for the job to finish (and download with --out)")
    s.add_argument("--out", help="with --wait: where to write the result")
    s.set_defaults(func=cmd_submit)

    st = sub.add_parser("status", help="print a job's state and progress")
    _gateway_args(st)
    st.add_argument("job_id")
    st.add_argument("--json", action="store_true", help="the whole job as JSON")
    st.set_defaults(func=cmd_status)

    w = sub.add_parser("wait", help="wait until a job is finished (exit 0: succeeded, 1: failed or cancelled)")
    _gateway_args(w)
    w.add_argument("job_id")
    w.add_argument("--timeout", type=float, help="give up after this many seconds (exit 2)")
    w.add_argument("--out", help="download the result here when it succeeded")
    w.set_defaults(func=cmd_wait)

    d = sub.add_parser("download", help="download a finished job's file (resumes a partial download)")
    _gateway_args(d)
    d.add_argument("job_id")
    d.add_argument("--out", required=True, help="output path")
    d.set_defaults(func=cmd_download)

    ls = sub.add_parser("list", help="this key's recent jobs")
    _gateway_args(ls)
    ls.add_argument("--limit", type=int, default=20)
    ls.set_defaults(func=cmd_list)

    cx = sub.add_parser("cancel", help="cancel a queued or running job (a finished one is deleted)")
    _gateway_args(cx)
    cx.add_argument("job_id")
    cx.set_defaults(func=cmd_cancel)


def _gateway_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gateway", default=os.environ.get("TTS_GATEWAY_URL", DEFAULT_GATEWAY),
                   help=f"the gateway's base URL (env TTS_GATEWAY_URL; default {DEFAULT_GATEWAY})")
    p.add_argument("--api-key", default=os.environ.get("TTS_GATEWAY_API_KEY"),
                   help="API key (env TTS_GATEWAY_API_KEY)")


def _client(args: argparse.Namespace) -> JobClient:
    return JobClient(args.gateway, args.api_key)


def _line(job: dict[str, Any]) -> str:
    chars = job.get("characters") or {}
    segs = job.get("segments") or {}
    parts = [f"{job['id']} {job['state']}", f"{100 * float(job.get('progress') or 0):.0f}%"]
    if chars.get("total"):
        parts.append(f"{chars.get('done', 0)}/{chars['total']} characters")
    if segs.get("total"):
        parts.append(f"{segs.get('done', 0)}/{'~' if segs.get('estimated') else ''}{segs['total']} segments")
    if job.get("eta_seconds") is not None and job["state"] in ("running", "encoding"):
        parts.append(f"ETA {_duration(job['eta_seconds'])}")
    if job.get("error"):
        parts.append(f"error: {job['error']['message']}")
    return ", ".join(parts)


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class _Printer:
    """Progress on stderr: one rewritten line on a terminal, a line per change otherwise."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.last = ""

    def __call__(self, job: dict[str, Any]) -> None:
        line = _line(job)
        if line == self.last:
            return
        self.last = line
        if self.tty:
            print("\r\033[K" + line, end="" if job["state"] not in _TERMINAL else "\n", file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)


def _finish(client: JobClient, job_id: str, out: str | None, timeout: float | None, quiet: bool) -> int:
    job = client.wait(job_id, timeout, on_progress=None if quiet else _Printer())
    if job["state"] != "succeeded":
        print(_line(job))
        return 1
    if out:
        path = client.download(job_id, out)
        result = job.get("result") or {}
        print(f"wrote {path} ({result.get('duration_s', 0):.1f} s of audio, {len(job.get('chapters') or [])} "
              f"chapter(s), {result.get('bytes', 0)} bytes)")
    else:
        print(_line(job))
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    if args.out and not args.wait:
        raise InputError("--out needs --wait", "add --wait, or download later with `client job download`")
    fields: dict[str, Any] = {"title": args.title, "author": args.author, "bitrate": args.bitrate}
    for flag, (name, _) in _PARAM_FLAGS.items():
        fields[name] = getattr(args, name)
    if args.greedy:
        fields["do_sample"] = False
        fields["num_beams"] = fields["num_beams"] or 1
    text = args.text
    if args.text_file:
        try:
            text = Path(args.text_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"cannot read {args.text_file!r} as UTF-8 ({exc})",
                             "check the path and the file's encoding") from None
    client = _client(args)
    job = client.submit(args.voice, args.format, file=args.file, text=text, **fields)
    print(job["id"])
    if not args.wait:
        return 0
    return _finish(client, job["id"], args.out, None, getattr(args, "quiet", False))


def cmd_status(args: argparse.Namespace) -> int:
    job = _client(args).get(args.job_id)
    print(json.dumps(job, indent=1) if args.json else _line(job))
    return 0


def cmd_wait(args: argparse.Namespace) -> int:
    return _finish(_client(args), args.job_id, args.out, args.timeout, getattr(args, "quiet", False))


def cmd_download(args: argparse.Namespace) -> int:
    path = _client(args).download(args.job_id, args.out)
    print(f"wrote {path} ({path.stat().st_size} bytes)")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    for job in _client(args).list(args.limit):
        print(_line(job))
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    job = _client(args).cancel(args.job_id)
    print(f"{args.job_id} deleted" if job.get("deleted") else _line(job))
    return 0
