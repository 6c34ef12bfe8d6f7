"""Block maps: which 4 KiB blocks of a sparse disk image hold data, with a checksum per range.

The file format is bmap-tools' XML (format 2.0), so `bmaptool copy` accepts
the maps `kiosk build` writes and `kiosk flash` accepts the maps `bmaptool
create` writes (formats 1.0-1.4 and 2.0). A range is mapped when the image's
file system has blocks for it (FIEMAP, as bmaptool; unwritten extents
included); holes are never written to the card, which is what makes
flashing a half-empty image fast.

`BmapFileChecksum` follows bmaptool exactly: the hash of the whole file as
written, with the checksum's own digits replaced by ASCII zeros.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import re
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from xml.etree import ElementTree

from kiosk.core.errors import KioskError, one_line
from kiosk.core.files import human_size
from kiosk.core.inputs import read_small

BLOCK_SIZE = 4096
FORMAT_VERSION = "2.0"
CHECKSUM_TYPE = "sha256"
_CHUNK = 4 << 20
# The highest format major version kiosk reads (bmaptool's own limit).
_MAX_MAJOR = 2
# The checksums a map may name: bmaptool's (SHA-1 in format 1.3, SHA-256 or SHA-1 in 1.4 and 2.0).
CHECKSUM_TYPES = ("sha1", "sha256")
# A map of a fragmented 64 GiB image is a few MiB (one short line per range); anything far larger is not a map.
MAX_BMAP_BYTES = 16 << 20
# The numbers in a map: up to 2**64 (no disk is larger); more digits than that is not a size.
_MAX_DIGITS = 20


class InvalidBmap(KioskError):
    """A block map that is not well formed, or does not match its image; exit status 2."""

    exit_code = 2


@dataclass(frozen=True)
class BlockMap:
    """A parsed block map. `ranges` are inclusive block numbers with the range's hex digest (or None)."""

    image_size: int
    block_size: int
    ranges: tuple[tuple[int, int, str | None], ...]
    mapped_blocks: int
    checksum_type: str | None
    version: str = FORMAT_VERSION

    @property
    def blocks_count(self) -> int:
        return -(-self.image_size // self.block_size)

    @property
    def mapped_bytes(self) -> int:
        """Bytes covered by the ranges; the last block may be partial (images need not be block-aligned)."""
        return sum(end - start for start, end in self.byte_ranges())

    def byte_range(self, first: int, last: int) -> tuple[int, int]:
        """[start, end) in bytes of inclusive blocks first..last, clipped to the image size."""
        return first * self.block_size, min((last + 1) * self.block_size, self.image_size)

    def byte_ranges(self) -> list[tuple[int, int]]:
        return [self.byte_range(first, last) for first, last, _ in self.ranges]


# ---------------------------------------------------------------------------------------------
# Finding the mapped ranges of a sparse file

def mapped_ranges(fd: int, size: int, block_size: int = BLOCK_SIZE) -> list[tuple[int, int]]:
    """Inclusive (first, last) block ranges holding data.

    The extents come from FIEMAP, as bmaptool's do: it also lists unwritten
    (preallocated) extents, which mke2fs makes for the journal and the end of
    the device and which must reach the card as zeros. SEEK_DATA cannot be
    used for those: on ext4 it reports them as holes or data depending on
    what is in the page cache, so the map would change from run to run. Where
    FIEMAP is missing, SEEK_DATA/SEEK_HOLE; where both are, the whole file.
    Extents are widened to whole blocks and touching ranges merged.
    """
    if size <= 0:
        return []
    blocks = -(-size // block_size)
    try:
        extents = _fiemap_extents(fd, size)
    except OSError as exc:
        if exc.errno not in _UNSUPPORTED:
            raise
        try:
            extents = _seek_extents(fd, size)
        except OSError as exc2:
            if exc2.errno in _UNSUPPORTED:  # no hole support either: all data
                return [(0, blocks - 1)]
            raise
    ranges: list[tuple[int, int]] = []
    for start, end in extents:
        first = start // block_size
        last = min(-(-min(end, size) // block_size), blocks) - 1
        if last < first:
            continue
        if ranges and first <= ranges[-1][1] + 1:
            ranges[-1] = (ranges[-1][0], max(last, ranges[-1][1]))
        else:
            ranges.append((first, last))
    return ranges


_UNSUPPORTED = (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOTTY)
_FS_IOC_FIEMAP = 0xC020660B
_FIEMAP_FLAG_SYNC = 0x1
_FIEMAP_EXTENT_LAST = 0x1
_FIEMAP_HEADER = struct.Struct("=QQLLLL")       # fm_start, fm_length, fm_flags, fm_mapped, fm_count, reserved
_FIEMAP_EXTENT = struct.Struct("=QQQQQLLLL")    # logical, physical, length, 2 reserved, flags, 3 reserved
_FIEMAP_BATCH = 512


def _fiemap_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """Byte extents [start, end) the file system has allocated, unwritten ones included (FIEMAP)."""
    out: list[tuple[int, int]] = []
    start = 0
    while start < size:
        request = bytearray(_FIEMAP_HEADER.size + _FIEMAP_BATCH * _FIEMAP_EXTENT.size)
        _FIEMAP_HEADER.pack_into(request, 0, start, size - start, _FIEMAP_FLAG_SYNC, 0, _FIEMAP_BATCH, 0)
        fcntl.ioctl(fd, _FS_IOC_FIEMAP, request)
        mapped = _FIEMAP_HEADER.unpack_from(request, 0)[3]
        if mapped == 0:
            break
        last_flags = 0
        for i in range(mapped):
            logical, _phys, length, _r1, _r2, flags, *_ = _FIEMAP_EXTENT.unpack_from(
                request, _FIEMAP_HEADER.size + i * _FIEMAP_EXTENT.size)
            if logical >= size:
                last_flags = _FIEMAP_EXTENT_LAST
                break
            out.append((logical, min(logical + length, size)))
            start, last_flags = logical + length, flags
        if last_flags & _FIEMAP_EXTENT_LAST:
            break
    return out


def _seek_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """Byte extents [start, end) holding data, from SEEK_DATA/SEEK_HOLE."""
    out: list[tuple[int, int]] = []
    offset = 0
    while offset < size:
        try:
            data = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data after offset
                break
            raise
        if data >= size:
            break
        hole = os.lseek(fd, data, os.SEEK_HOLE)
        out.append((data, min(hole, size)))
        offset = hole
    return out


def _range_digest(fd: int, start: int, end: int, kind: str) -> str:
    h = hashlib.new(kind)
    pos = start
    while pos < end:
        chunk = os.pread(fd, min(_CHUNK, end - pos), pos)
        if not chunk:
            raise KioskError(f"image shrank while being read (at byte {pos})")
        h.update(chunk)
        pos += len(chunk)
    return h.hexdigest()


def block_map_of(image: Path, *, checksums: bool = True) -> BlockMap:
    """The block map of a sparse image file (4 KiB blocks, sha256 per mapped range)."""
    try:
        fd = os.open(image, os.O_RDONLY)
    except OSError as exc:
        raise KioskError(f"cannot read image {image}: {exc.strerror}") from None
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            raise InvalidBmap(f"{image}: the image is empty; rebuild it")
        # Settle delayed allocation before asking where the data is (bmaptool's FIEMAP_FLAG_SYNC).
        try:
            os.fsync(fd)
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.EROFS):  # file systems without fsync
                raise
        out = []
        mapped = 0
        for first, last in mapped_ranges(fd, size):
            start, end = first * BLOCK_SIZE, min((last + 1) * BLOCK_SIZE, size)
            out.append((first, last, _range_digest(fd, start, end, CHECKSUM_TYPE) if checksums else None))
            mapped += last - first + 1
        return BlockMap(size, BLOCK_SIZE, tuple(out), mapped, CHECKSUM_TYPE if checksums else None)
    except OSError as exc:
        raise KioskError(f"cannot read image {image}: {exc.strerror}") from None
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# Writing

def render(bmap: BlockMap) -> bytes:
    """The XML text of a block map, its BmapFileChecksum filled in. Same map, same bytes."""
    if bmap.checksum_type != CHECKSUM_TYPE:
        raise ValueError("kiosk writes sha256 block maps only")
    digest_len = len(hashlib.new(CHECKSUM_TYPE).hexdigest())
    blocks = bmap.blocks_count
    percent = bmap.mapped_blocks * 100.0 / blocks
    lines = [
        '<?xml version="1.0" ?>',
        "<!-- Block map of a disk image, written by kiosk in bmap-tools' format: the blocks",
        "     that hold data and must be copied to the card; all other blocks are holes.",
        "     Flash it with 'kiosk flash IMAGE DEVICE' or 'bmaptool copy IMAGE DEVICE'. -->",
        "",
        f'<bmap version="{FORMAT_VERSION}">',
        f"    <!-- Image size in bytes: {human_size(bmap.image_size)} -->",
        f"    <ImageSize> {bmap.image_size} </ImageSize>",
        "",
        "    <!-- Size of a block in bytes -->",
        f"    <BlockSize> {bmap.block_size} </BlockSize>",
        "",
        "    <!-- Count of blocks in the image file -->",
        f"    <BlocksCount> {blocks} </BlocksCount>",
        "",
        f"    <!-- Count of mapped blocks: {human_size(bmap.mapped_blocks * bmap.block_size)}"
        f" or {percent:.1f}% -->",
        f"    <MappedBlocksCount> {bmap.mapped_blocks} </MappedBlocksCount>",
        "",
        "    <!-- Type of checksum used in this file -->",
        f"    <ChecksumType> {CHECKSUM_TYPE} </ChecksumType>",
        "",
        "    <!-- The checksum of this bmap file. When it is calculated, the value of",
        '         the checksum has to be zero (all ASCII "0" symbols). -->',
        f"    <BmapFileChecksum> {'0' * digest_len} </BmapFileChecksum>",
        "",
        "    <!-- Mapped ranges of blocks, first-last (inclusive) or a single block;",
        "         'chksum' is the checksum of the range's bytes. -->",
        "    <BlockMap>",
    ]
    for first, last, digest in bmap.ranges:
        text = f"{first}-{last}" if first != last else f"{first}"
        lines.append(f'        <Range chksum="{digest}"> {text} </Range>')
    lines += ["    </BlockMap>", "</bmap>", ""]
    body = "\n".join(lines).encode("ascii")
    digest = hashlib.new(CHECKSUM_TYPE, body).hexdigest()
    marker = b"<BmapFileChecksum> " + b"0" * digest_len
    assert body.count(marker) == 1
    return body.replace(marker, b"<BmapFileChecksum> " + digest.encode("ascii"))


def write_bmap(image: Path, bmap_path: Path) -> None:
    """Write the block map of `image` to `bmap_path` atomically (temp file in the same directory, rename)."""
    image, bmap_path = Path(image), Path(bmap_path)
    text = render(block_map_of(image))
    fd, tmp = tempfile.mkstemp(prefix=f".{bmap_path.name}.", suffix=".tmp", dir=bmap_path.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, bmap_path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


# ---------------------------------------------------------------------------------------------
# Reading

_RANGE = re.compile(r"\s*([0-9]{1,%d})\s*(?:-\s*([0-9]{1,%d})\s*)?" % (_MAX_DIGITS, _MAX_DIGITS))


def _shown(text: str, most: int = 70) -> str:
    """A value from the map as a message shows it: quoted, and cut when long."""
    return repr(text if len(text) <= most else text[:most] + "...")


def read_bmap(path: Path) -> BlockMap:
    """Parse and check a block map (kiosk's or bmaptool's, formats 1.0-1.4 and 2.0)."""
    path = Path(path)
    raw = read_small(path, "block map", MAX_BMAP_BYTES,
                     hint="pass the image's .bmap file with --bmap, or none to write the image's data extents")
    return parse_bmap(raw, str(path))


def parse_bmap(raw: bytes, source: str = "block map") -> BlockMap:
    fix = "rebuild the image (kiosk build) or recreate the map with 'bmaptool create IMAGE -o IMAGE.bmap'"

    def bad(message: str) -> InvalidBmap:
        return InvalidBmap(one_line(f"{source}: not a valid block map: {message}"), hint=fix)

    try:
        root = ElementTree.fromstring(raw)
    except ElementTree.ParseError as exc:
        raise bad(f"XML error: {exc}") from None
    if root.tag != "bmap":
        raise bad(f"the root element is <{root.tag[:70]}>, not <bmap>")
    version = (root.get("version") or "").strip()
    match = re.fullmatch(r"([0-9]{1,4})\.([0-9]{1,4})", version)
    if not match:
        raise bad(f"missing or malformed version attribute {_shown(version)}")
    major, minor = int(match[1]), int(match[2])
    if major > _MAX_MAJOR or major == 0:
        raise bad(f"format version {version} is not supported (kiosk reads 1.x and 2.0)")

    def number(tag: str) -> int:
        element = root.find(tag)
        if element is None or element.text is None:
            raise bad(f"<{tag}> is missing")
        text = element.text.strip()
        if not re.fullmatch(r"[0-9]{1,%d}" % _MAX_DIGITS, text):
            raise bad(f"<{tag}> is {_shown(text)}, not a number of at most {_MAX_DIGITS} digits")
        return int(text)

    image_size = number("ImageSize")
    block_size = number("BlockSize")
    blocks_count = number("BlocksCount")
    mapped_count = number("MappedBlocksCount")
    if block_size == 0 or block_size % 512:
        raise bad(f"block size {block_size} is not a multiple of 512")
    if image_size == 0:
        raise bad("the image size is 0")
    if blocks_count != -(-image_size // block_size):
        raise bad(f"{blocks_count} blocks of {block_size} bytes do not make an image of {image_size} bytes")

    # Format 1.3 used SHA1 only; 1.4 (a mistake, identical to 2.0) and 2.0 name the hash.
    if major >= 2 or (major, minor) == (1, 4):
        element = root.find("ChecksumType")
        if element is None or not (element.text or "").strip():
            raise bad("<ChecksumType> is missing")
        kind = element.text.strip().lower()
        range_attr, file_tag = "chksum", "BmapFileChecksum"
    elif minor == 3:
        kind, range_attr, file_tag = "sha1", "sha1", "BmapFileSHA1"
    else:
        kind, range_attr, file_tag = None, None, None
    digest_len = 0
    if kind is not None:
        if kind not in CHECKSUM_TYPES:
            raise bad(f"unknown checksum type {_shown(kind)} (kiosk reads {' or '.join(CHECKSUM_TYPES)})")
        digest_len = len(hashlib.new(kind).hexdigest())
        element = root.find(file_tag)
        if element is None or not (element.text or "").strip():
            raise bad(f"<{file_tag}> is missing")
        stated = element.text.strip()
        if not re.fullmatch(rf"[0-9a-fA-F]{{{digest_len}}}", stated):
            raise bad(f"<{file_tag}> {_shown(stated)} is not a {kind} digest")
        # bmaptool's rule: hash the file with the first occurrence of the digest replaced by zeros.
        pos = raw.find(stated.encode("ascii"))
        zeroed = raw[:pos] + b"0" * digest_len + raw[pos + digest_len:]
        actual = hashlib.new(kind, zeroed).hexdigest()
        if actual != stated.lower():
            raise bad(f"its {file_tag} is {stated} but the file's checksum is {actual} (the file was changed or cut)")

    blockmap = root.find("BlockMap")
    if blockmap is None:
        raise bad("<BlockMap> is missing")
    ranges = []
    mapped = 0
    previous_last = -1
    for element in blockmap.findall("Range"):
        text = element.text or ""
        m = _RANGE.fullmatch(text)
        if not m:
            raise bad(f"range {_shown(text.strip())} is not 'first-last' or a block number")
        first = int(m[1])
        last = int(m[2]) if m[2] is not None else first
        label = f"range {first}-{last}"
        if first > last:
            raise bad(f"{label} ends before it starts")
        if last >= blocks_count:
            raise bad(f"{label} goes past the image's last block {blocks_count - 1}")
        if first <= previous_last:
            raise bad(f"{label} overlaps or precedes the range before it")
        previous_last = last
        digest = element.get(range_attr) if range_attr else None
        if digest is not None:
            digest = digest.strip().lower()
            if not re.fullmatch(rf"[0-9a-f]{{{digest_len}}}", digest):
                raise bad(f"{label} has checksum {_shown(digest)}, not a {kind} digest")
        ranges.append((first, last, digest))
        mapped += last - first + 1
    if mapped != mapped_count:
        raise bad(f"<MappedBlocksCount> says {mapped_count} blocks but the ranges hold {mapped}")
    return BlockMap(image_size, block_size, tuple(ranges), mapped, kind, version)
