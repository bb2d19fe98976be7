"""Where images (and video/audio) may come from, and how big they may be, on a Fast-dVLM server.

SGLang 0.5.23 loads a media string as (`srt/utils/common.py`, `load_image` / `get_image_bytes`):
`http(s)://` fetched, `file://` or a leading `/` read from the server's disk, `data:` decoded,
anything else base64-decoded. So by default any client could read the server's files or make it
fetch any URL (its own metrics, a cloud metadata address). The policy (`limits.py` for the flags):

- `data:` URLs and bare base64: always; an image must be `image/*`, decodable, and at most
  `max_image_pixels` (read from its header, so a decompression bomb is refused before decoding);
- local files: only with `--allowed-local-media-path DIR`, only an absolute path or `file://` URL
  whose real path (links and `..` resolved) is inside DIR; refused without touching the file
  system otherwise, so a refusal never tells whether a path exists;
- http(s): only with `--allow-image-urls`; SGLang's `--allowed-media-domains` list (if given)
  is checked by SGLang, and every host not on it must resolve to public addresses only (no
  loopback, private, link-local/metadata, multicast or reserved address). SGLang follows
  redirects itself and checks each hop with `_assert_media_url_allowed`; our hook on that
  function applies the address rule to every hop too.

`check_media_item` runs in the request checks (`request_checks.py`, before SGLang loads
anything); the two loader hooks below run where SGLang fetches and decodes, as a second line.
"""

from __future__ import annotations

import base64
import binascii
import io
import ipaddress
import os
import socket
from urllib.parse import unquote, urlparse

from .limits import ServingLimits, current


def _kind(source: str) -> str:
    """SGLang's classification of a media string (`get_image_bytes`)."""
    lowered = source[:8].lower()
    if lowered.startswith(("http://", "https://")):
        return "url"
    if lowered.startswith("file://") or source.startswith("/"):
        return "file"
    if lowered.startswith("data:"):
        return "data"
    return "base64"


def media_source(item) -> str | None:
    """The string SGLang will load for one media item (a str, an ImageData or its dict form)."""
    if isinstance(item, str):
        return item
    if isinstance(item, dict):
        url = item.get("url")
    else:
        url = getattr(item, "url", None)
    return url if isinstance(url, str) else None


def _check_image(fp, what: str, limits: ServingLimits, header_only: bool = False) -> str | None:
    from PIL import Image

    try:
        with Image.open(fp) as img:
            width, height = img.size
            if limits.max_image_pixels and width * height > limits.max_image_pixels:
                return pixels_message(width, height, limits)
            if not header_only:
                img.verify()
    except Image.DecompressionBombError:
        return f"{what} has too many pixels (limit {limits.max_image_pixels}, --max-image-pixels)."
    except Exception:
        return f"{what} does not contain a decodable image."
    return None


def pixels_message(width: int, height: int, limits: ServingLimits) -> str:
    return (f"Image of {width} x {height} = {width * height} pixels exceeds this server's limit of "
            f"{limits.max_image_pixels} pixels per image (--max-image-pixels).")


def _check_data_url(url: str, modality: str, limits: ServingLimits) -> str | None:
    header, sep, payload = url.partition(",")
    if not sep:
        return "Data URL has no payload."
    media_type = header[5:].split(";")[0].strip().lower()
    if not media_type.startswith(modality + "/"):
        return f"A data URL for {'an' if modality[0] in 'aeiou' else 'a'} {modality} must have a {modality}/* media " \
               f"type, got {media_type or 'none'!r}."
    if ";base64" not in header.lower():
        return "Data URL must be base64-encoded."
    if modality != "image":
        return None
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        return "Image data URL is not valid base64."
    return _check_image(io.BytesIO(raw), "Image data URL", limits)


def _check_base64(source: str, modality: str, limits: ServingLimits) -> str | None:
    try:
        raw = base64.b64decode(source, validate=True)
    except (binascii.Error, ValueError):
        return (f"{modality.capitalize()} must be a data: URL (or base64); got a string that is neither. "
                "Local paths and http(s) URLs are refused unless the server allows them.")
    if modality != "image":
        return None
    return _check_image(io.BytesIO(raw), "Base64 image", limits)


def _local_path(source: str) -> str:
    return unquote(urlparse(source).path) if source[:7].lower() == "file://" else source


def local_path_error(source: str, limits: ServingLimits) -> str | None:
    root = limits.allowed_local_media_path
    if root is None:
        return ("Local file paths are not read by this server (start it with --allowed-local-media-path DIR); "
                "send the media as a data: URL.")
    path = _local_path(source)
    if not os.path.isabs(path):
        return "A local media path must be absolute."
    real = os.path.realpath(path)
    if os.path.commonpath([real, root]) != root:
        return "Local media path is outside the directory this server reads media from (--allowed-local-media-path)."
    if not os.path.isfile(real):
        return "No such media file in the allowed media directory."
    return None


def address_error(host: str) -> str | None:
    """Refuse a host that is, or resolves to, anything but public unicast addresses."""
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError):
        return f"Media URL host {host!r} does not resolve."
    for info in infos:
        address = ipaddress.ip_address(info[4][0].split("%")[0])
        if getattr(address, "ipv4_mapped", None):
            address = address.ipv4_mapped
        if not address.is_global or address.is_multicast:
            return (f"Media URL host {host!r} is a loopback, private, link-local or reserved address; "
                    "this server fetches only public addresses (or hosts named in --allowed-media-domains).")
    return None


def _allowed_domains() -> set[str]:
    from sglang.srt.utils import common

    return set(getattr(common, "_allowed_media_domains", None) or ())


def url_error(url: str, limits: ServingLimits) -> str | None:
    if not limits.allow_media_urls:
        return ("Media URLs are not fetched by this server (start it with --allow-image-urls); "
                "send the media as a data: URL.")
    parsed = urlparse(url)
    host = parsed.hostname
    if parsed.scheme.lower() not in ("http", "https") or not host:
        return "Invalid media URL."
    if host.lower().rstrip(".") in _allowed_domains():
        return None
    return address_error(host)


def check_media_item(item, modality: str = "image", limits: ServingLimits | None = None) -> str | None:
    """Why one media item of a request is refused (None: SGLang may load it)."""
    limits = limits or current()
    source = media_source(item)
    if source is None:
        return None  # not a string source (an Engine-API PIL image): nothing is fetched or read
    kind = _kind(source)
    if kind == "data":
        return _check_data_url(source, modality, limits)
    if kind == "base64":
        return _check_base64(source, modality, limits)
    if kind == "file":
        error = local_path_error(source, limits)
        if error or modality != "image":
            return error
        with open(_local_path(source), "rb") as f:  # PIL reads the header only
            return _check_image(f, "Image file", limits, header_only=True)
    return url_error(source, limits)


def image_pixels(item) -> int:
    """Pixels of an image the request carries (data URL, base64 or an allowed local file; read from
    its header), 0 where unknown before SGLang fetches it (a URL). Call after `check_media_item`."""
    from PIL import Image

    source = media_source(item)
    if source is None:
        return 0
    kind = _kind(source)
    try:
        if kind == "file":
            with Image.open(_local_path(source)) as img:
                return img.size[0] * img.size[1]
        if kind in ("data", "base64"):
            raw = base64.b64decode(source.partition(",")[2] if kind == "data" else source)
            with Image.open(io.BytesIO(raw)) as img:
                return img.size[0] * img.size[1]
    except Exception:
        return 0
    return 0


# ---- hooks where SGLang fetches and decodes (listed in `hooks.HOOK_TARGETS`) -----------------------
def assert_media_url_allowed(original, url):
    """Every URL SGLang is about to fetch, redirects included: SGLang's domain check, then ours."""
    original(url)
    error = url_error(url, current())
    if error:
        raise ValueError(error)


def fully_load_pil_image(original, image):
    """The pixel cap at decode time, whatever the source (PIL has read only the header so far)."""
    limits = current()
    width, height = image.size
    if limits.max_image_pixels and width * height > limits.max_image_pixels:
        raise ValueError(pixels_message(width, height, limits))
    return original(image)
