"""Keep the API key out of everything batchrun prints, stores or exports.

The key is read from the environment only; a server that reflects it (in an error message, say)
must not get it into the database, an export or a terminal. Anything shaped like an OpenAI key
is hidden too, since a key pasted into the wrong option is no less secret.
"""

from __future__ import annotations

import os
import re

API_KEY_ENV = "OPENAI_API_KEY"
_KEYLIKE = re.compile(r"\b(sk-[A-Za-z0-9_\-]{6,}|sess-[A-Za-z0-9]{8,})")
_MASK = "[redacted]"


def redact(text: str) -> str:
    """``text`` with the API key and key-shaped strings replaced by ``[redacted]``."""
    key = os.environ.get(API_KEY_ENV, "").strip()
    if len(key) >= 8 and key in text:
        text = text.replace(key, _MASK)
    if "sk-" in text or "sess-" in text:
        text = _KEYLIKE.sub(_MASK, text)
    return text
