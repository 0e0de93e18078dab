"""What an OpenAI-shaped request asks beyond text and voice, checked against the served family: one home for the
speech route and long-form jobs.

OpenAI's API has ``instructions`` (a style prompt) and no language field; the served families differ in what they
take. ``instructions`` become IndexTTS-2's EMO_TEXT (a 400 for 1.x, which has no emotion control). IndexTTS-2.5
requires the text's language (it has no detection): a request's ``language`` (an extra body field), else a job's
book language (EPUB ``dc:language``), else the gateway's ``default_language``, else a 400 that names all three
fixes. ``language`` for a family without the input is a 400 too, so nothing asked for is dropped. The family's
accepted values come from the entry model's config (`languages`, written by the repository builder); when the
config cannot be read, values go as given and the server judges them by name.
"""

from __future__ import annotations

from typing import Any

from client.request import Controls
from gateway.errors import APIError

__all__ = ["family_controls", "primary_language"]


def _bad(message: str, param: str, code: str = "invalid_value") -> APIError:
    return APIError.bad_request(message, param=param, code=code)


def primary_language(tag: str | None) -> str | None:
    """A BCP 47 tag's primary subtag, lower-cased ("en-US" -> "en"); None for none."""
    if not tag or not isinstance(tag, str):
        return None
    return tag.strip().replace("_", "-").split("-")[0].lower() or None


async def family_controls(triton: Any, settings: Any, *, instructions: str | None = None,
                          language: str | None = None, duration_factor: float | None = None,
                          fallback_language: str | None = None) -> Controls | None:
    """Controls for the served family (None when nothing beyond the defaults is asked); APIError names the field.

    `fallback_language`: a language known from the content (a book's), used before the gateway's default when it
    is one the family takes."""
    model_id = settings.model_id
    emo_text = None
    if instructions:
        if await triton.text_emotion() is False:
            raise _bad(f"instructions (emotion from text) are not supported by the served model {model_id!r}: its "
                       "family (IndexTTS 1.x) has no emotion control. Fix: leave instructions out, or serve an "
                       "IndexTTS2 model", "instructions", "unsupported_parameter")
        emo_text = instructions
    accepted = await triton.languages()
    if language is not None:
        language = language.strip().lower()
        if accepted == ():
            raise _bad(f"language is not an input of the served model {model_id!r} (only IndexTTS-2.5 takes one; "
                       "this family reads the language from the text). Fix: leave language out", "language",
                       "unsupported_parameter")
        if accepted and language not in accepted:
            raise _bad(f"language {language!r} is not one the served model {model_id!r} speaks. Fix: use one of "
                       f"{', '.join(accepted)}", "language")
    elif accepted:
        fallback = primary_language(fallback_language)
        language = fallback if fallback in accepted else primary_language(settings.default_language)
        if language is None:
            raise _bad(f"language is required by the served model {model_id!r} (IndexTTS-2.5 has no language "
                       f"detection). Fix: pass language, one of {', '.join(accepted)} (openai SDK: "
                       "extra_body={\"language\": \"en\"}), or start the gateway with --default-language "
                       "(TTS_GATEWAY_DEFAULT_LANGUAGE)", "language", "missing_required_parameter")
        if language not in accepted:
            raise _bad(f"the gateway's default_language {language!r} is not one the served model {model_id!r} "
                       f"speaks. Fix: pass language, one of {', '.join(accepted)}, or correct "
                       "--default-language", "language")
    if emo_text is None and language is None and duration_factor is None:
        return None
    return Controls(emo_text=emo_text, language=language, duration_factor=duration_factor)
