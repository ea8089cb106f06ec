"""The server's limits and defaults, in one place (no FastAPI here: ``unclip serve`` reads
its flags' defaults from this module without loading the server).

- :class:`Limits`: what one request may ask for and how its body is parsed;
- the job queue's and the gallery's defaults (``unclip serve`` flags and ``create_app``);
- the host names that count as loopback.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

#: jobs that may wait for a worker (``--queue-size``); more get 429
DEFAULT_QUEUE_SIZE = 8
#: the gallery keeps at most this many MiB of image files (``--gallery-max-mb``), oldest first
DEFAULT_GALLERY_MAX_MB = 1024
#: and drops images older than this many days (``--gallery-max-days``; 0: no age limit)
DEFAULT_GALLERY_MAX_DAYS = 90
#: Host header names accepted by a server bound to a loopback address (DNS-rebinding defence)
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")
#: in an ``allowed_hosts`` list: any IP address literal (a DNS-rebinding page always sends a
#: name, never an address); ``unclip serve`` off loopback accepts these, the loopback names
#: and the names given with ``--allow-host``
ANY_IP_HOST = "<ip>"


@dataclass(frozen=True)
class Limits:
    """What one request may ask for. ``request_timeout`` (seconds) bounds queueing plus
    sampling of a job; a synchronous request that runs past it gets 504.

    JSON bodies are refused above ``max_json_bytes`` (413), and (400) nested deeper than
    ``max_json_depth`` (an object of plain fields is depth 1), with more than
    ``max_json_items`` keys and array elements in all (counted by the commas between
    them), with a string longer than
    ``max_json_string_chars`` (or ``max_prompt_chars`` if that is larger), or with a number
    written with more than ``max_json_number_chars`` characters."""

    max_prompt_chars: int = 1000
    max_n: int = 10
    max_frames: int = 16
    max_steps: int = 250
    max_upload_bytes: int = 4 * 2**20
    max_image_pixels: int = 2048 * 2048
    max_json_bytes: int = 2**20
    max_json_depth: int = 16
    max_json_items: int = 256
    max_json_string_chars: int = 4096
    max_json_number_chars: int = 64
    request_timeout: float = 300.0

    def __post_init__(self) -> None:
        for key, value in asdict(self).items():
            if not value > 0:
                raise ValueError(f"limit {key} must be positive, got {value}")


#: the defaults, for flags that show them
DEFAULT_LIMITS = Limits()
