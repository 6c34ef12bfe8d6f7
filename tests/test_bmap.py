"""Block maps: bmaptool's format both ways, exact checksums, every malformation named."""

import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from kiosk.image import bmap as bm
from kiosk.core.errors import KioskError
from kiosk.core.files import human_size

MiB = 1 << 20
needs_bmaptool = pytest.mark.skipif(not shutil.which("bmaptool"), reason="bmap-tools not installed")


def make_disk_image(path: Path, size: int = 64 * MiB) -> Path:
    """A small real SD-card image: MBR, a FAT partition with a 'kernel', an ext4 one with files; sparse."""
    with open(path, "wb") as f:
        f.truncate(size)
    boot_start, boot_sectors = 2048, 16 * MiB // 512
    root_start = boot_start + boot_sectors
    subprocess.run(["sfdisk", "-q", str(path)], check=True, capture_output=True, text=True,
                   input=f"label: dos\nstart={boot_start}, size={boot_sectors}, type=c\n"
                         f"start={root_start}, type=83\n")
    subprocess.run(["mkfs.vfat", "-n", "BOOT", "--offset", str(boot_start), str(path), str(boot_sectors // 2)],
                   check=True, capture_output=True)
    files = path.parent / f"{path.name}.files"
    files.mkdir()
    kernel = files / "kernel.img"
    kernel.write_bytes(os.urandom(300_000))
    subprocess.run(["mcopy", "-i", f"{path}@@{boot_start * 512}", str(kernel), "::kernel.img"],
                   check=True, capture_output=True)
    root = files / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "hostname").write_text("lobby\n")
    (root / "usr.bin").write_bytes(os.urandom(1_500_000))
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-L", "rootfs", "-E", f"offset={root_start * 512}",
                    "-d", str(root), str(path), f"{(size - root_start * 512) // 1024}k"],
                   check=True, capture_output=True)
    shutil.rmtree(files)
    return path


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    return make_disk_image(tmp_path_factory.mktemp("bmapimg") / "disk.img")


def bmaptool_create(image: Path, out: Path) -> Path:
    subprocess.run(["bmaptool", "create", str(image), "-o", str(out)], check=True, capture_output=True)
    return out


def file_checksum_ok(raw: bytes, tag: str, kind: str) -> bool:
    stated = re.search(rf"<{tag}> *([0-9a-f]+) *</{tag}>".encode(), raw)[1]
    zeroed = raw.replace(stated, b"0" * len(stated), 1)
    return hashlib.new(kind, zeroed).hexdigest().encode() == stated


def sparse(tmp_path, size, chunks, name="sparse.img"):
    path = tmp_path / name
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in chunks:
            f.seek(offset)
            f.write(data)
    return path


# --- mapped ranges ---------------------------------------------------------------------------

def test_mapped_ranges_are_the_data_extents_in_whole_blocks(tmp_path):
    path = sparse(tmp_path, 10 * MiB, [(0, b"\x01" * 512), (5000, b"x"), (4 * MiB, os.urandom(3 * 4096 + 1))])
    fd = os.open(path, os.O_RDONLY)
    try:
        assert bm.mapped_ranges(fd, os.fstat(fd).st_size) == [(0, 1), (1024, 1027)]
    finally:
        os.close(fd)


def test_unaligned_image_size_maps_the_partial_last_block(tmp_path):
    path = sparse(tmp_path, 3 * 4096 + 100, [(3 * 4096, b"tail")])
    fd = os.open(path, os.O_RDONLY)
    try:
        assert bm.mapped_ranges(fd, os.fstat(fd).st_size) == [(3, 3)]
    finally:
        os.close(fd)
    m = bm.block_map_of(path)
    assert m.blocks_count == 4 and m.byte_range(3, 3) == (3 * 4096, 3 * 4096 + 100)
    # The range's checksum covers the image's bytes only, as bmaptool's does.
    assert m.ranges[0][2] == hashlib.sha256(b"tail" + b"\0" * 96).hexdigest()


def test_without_hole_support_everything_is_mapped(tmp_path, monkeypatch):
    path = sparse(tmp_path, 5 * 4096 + 1, [(0, b"a")])
    real_lseek = os.lseek

    def lseek(fd, pos, how):
        if how in (os.SEEK_DATA, os.SEEK_HOLE):
            raise OSError(22, "Invalid argument")
        return real_lseek(fd, pos, how)

    def ioctl(fd, request, arg):
        raise OSError(25, "Inappropriate ioctl for device")

    monkeypatch.setattr(os, "lseek", lseek)
    monkeypatch.setattr(bm.fcntl, "ioctl", ioctl)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert bm.mapped_ranges(fd, 5 * 4096 + 1) == [(0, 5)]
    finally:
        os.close(fd)


def test_without_fiemap_seek_data_finds_the_same_written_ranges(tmp_path, monkeypatch):
    path = sparse(tmp_path, 10 * MiB, [(0, b"\x01" * 512), (4 * MiB, os.urandom(3 * 4096 + 1))])

    def ioctl(fd, request, arg):
        raise OSError(95, "Operation not supported")

    fd = os.open(path, os.O_RDONLY)
    try:
        with_fiemap = bm.mapped_ranges(fd, os.fstat(fd).st_size)
        monkeypatch.setattr(bm.fcntl, "ioctl", ioctl)
        assert bm.mapped_ranges(fd, os.fstat(fd).st_size) == with_fiemap == [(0, 0), (1024, 1027)]
    finally:
        os.close(fd)


def test_preallocated_unwritten_extents_are_mapped_as_bmaptool_does(tmp_path):
    """mke2fs preallocates the journal (unwritten extents): they read as zeros and must reach the card
    as zeros, whatever the page cache holds (SEEK_DATA's answer for them changes with it)."""
    path = sparse(tmp_path, 8 * MiB, [(0, b"mbr")])
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 2 * MiB, MiB)
        if subprocess.run(["filefrag", "-v", str(path)], capture_output=True, text=True).stdout.count(
                "unwritten") == 0:
            pytest.skip("this file system has no unwritten extents")
        assert bm.mapped_ranges(fd, 8 * MiB) == [(0, 0), (512, 767)]
    finally:
        os.close(fd)
    if shutil.which("bmaptool"):
        assert bm.read_bmap(bmaptool_create(path, tmp_path / "t.bmap")).ranges == bm.block_map_of(path).ranges


def test_an_all_hole_image_maps_nothing(tmp_path):
    path = sparse(tmp_path, MiB, [])
    m = bm.block_map_of(path)
    assert m.ranges == () and m.mapped_blocks == 0
    out = tmp_path / "empty.bmap"
    bm.write_bmap(path, out)
    assert bm.read_bmap(out).ranges == ()


def test_an_empty_image_is_refused(tmp_path):
    path = sparse(tmp_path, 0, [])
    with pytest.raises(bm.InvalidBmap, match=r"the image is empty; rebuild it$"):
        bm.write_bmap(path, tmp_path / "x.bmap")
    assert not (tmp_path / "x.bmap").exists()


# --- writing ---------------------------------------------------------------------------------

def test_write_bmap_round_trips_with_sha256_of_each_range(image, tmp_path):
    out = Path(str(image) + ".bmap")
    bm.write_bmap(image, out)
    m = bm.read_bmap(out)
    assert (m.image_size, m.block_size, m.checksum_type, m.version) == (64 * MiB, 4096, "sha256", "2.0")
    assert 1 < len(m.ranges) and m.mapped_blocks == sum(l - f + 1 for f, l, _ in m.ranges)
    assert m.mapped_bytes < 8 * MiB  # mostly holes
    assert m.ranges[0][0] == 0  # the partition table
    data = image.read_bytes()
    for first, last, digest in m.ranges:
        start, end = m.byte_range(first, last)
        assert hashlib.sha256(data[start:end]).hexdigest() == digest
    # Everything outside the ranges is zero: the map lost no data.
    covered = bytearray(len(data))
    for start, end in m.byte_ranges():
        covered[start:end] = data[start:end]
    assert bytes(covered) == data


def test_write_bmap_is_deterministic_atomic_and_self_checksummed(image, tmp_path):
    a, b = tmp_path / "a.bmap", tmp_path / "b.bmap"
    bm.write_bmap(image, a)
    bm.write_bmap(image, b)
    assert a.read_bytes() == b.read_bytes()
    b.write_text("stale")
    bm.write_bmap(image, b)  # replaces an existing file
    assert a.read_bytes() == b.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bmap", "b.bmap"]  # no temp files left
    raw = a.read_bytes()
    assert file_checksum_ok(raw, "BmapFileChecksum", "sha256")
    assert raw.startswith(b'<?xml version="1.0" ?>') and b'<bmap version="2.0">' in raw
    assert b"<ChecksumType> sha256 </ChecksumType>" in raw and b"<BlockSize> 4096 </BlockSize>" in raw
    assert oct(a.stat().st_mode & 0o777) == "0o644"


def test_write_bmap_leaves_nothing_behind_when_the_image_is_unreadable(tmp_path):
    with pytest.raises(KioskError, match=r"^cannot read image .*missing\.img: No such file or directory$"):
        bm.write_bmap(tmp_path / "missing.img", tmp_path / "missing.img.bmap")
    assert list(tmp_path.iterdir()) == []


@needs_bmaptool
def test_same_ranges_and_checksums_as_bmaptool_create(image, tmp_path):
    ours = tmp_path / "ours.bmap"
    bm.write_bmap(image, ours)
    theirs = bm.read_bmap(bmaptool_create(image, tmp_path / "theirs.bmap"))
    assert bm.read_bmap(ours).ranges == theirs.ranges
    assert theirs.checksum_type == "sha256"


@needs_bmaptool
def test_same_as_bmaptool_for_an_odd_sized_image(tmp_path):
    path = sparse(tmp_path, 7 * 4096 + 123, [(0, os.urandom(10)), (6 * 4096, os.urandom(4096 + 123))])
    ours = tmp_path / "ours.bmap"
    bm.write_bmap(path, ours)
    assert bm.read_bmap(ours).ranges == bm.read_bmap(bmaptool_create(path, tmp_path / "t.bmap")).ranges


@needs_bmaptool
def test_bmaptool_copy_accepts_our_map_and_copies_identically(image, tmp_path):
    ours = tmp_path / "ours.bmap"
    bm.write_bmap(image, ours)
    out = tmp_path / "copy.img"
    run = subprocess.run(["bmaptool", "copy", "--bmap", str(ours), str(image), str(out)],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "checksum" not in run.stderr.lower()
    assert out.read_bytes() == image.read_bytes()


@needs_bmaptool
def test_bmaptool_rejects_our_map_once_changed(image, tmp_path):
    """Proof that bmaptool checks our BmapFileChecksum (so the rule matches, it is not just ignored)."""
    ours = tmp_path / "ours.bmap"
    bm.write_bmap(image, ours)
    ours.write_bytes(ours.read_bytes().replace(b"Image size in bytes", b"Image size in Bytes"))
    run = subprocess.run(["bmaptool", "copy", "--bmap", str(ours), str(image), str(tmp_path / "o.img")],
                         capture_output=True, text=True)
    assert run.returncode != 0 and "checksum mismatch for bmap file" in run.stderr


# --- reading bmaptool's files ----------------------------------------------------------------

def to_v13(raw: bytes, image: Path) -> bytes:
    """bmaptool 2.0 output rewritten as format 1.3 (SHA1 everywhere), its file SHA1 recomputed."""
    data = image.read_bytes()
    text = raw.decode()
    text = text.replace('version="2.0"', 'version="1.3"')
    text = re.sub(r"\s*<!-- Type of checksum.*?</ChecksumType>\n", "\n", text, flags=re.S)

    def range_sha1(m):
        first, last = int(m[2]), int(m[3] or m[2])
        return f'<Range sha1="{hashlib.sha1(data[first * 4096:(last + 1) * 4096]).hexdigest()}"> {m[2]}' \
               f'{"-" + m[3] if m[3] else ""} </Range>'

    text = re.sub(r'<Range chksum="([0-9a-f]+)"> (\d+)(?:-(\d+))? </Range>', range_sha1, text)
    text = re.sub(r"<BmapFileChecksum> [0-9a-f]+ </BmapFileChecksum>",
                  "<BmapFileSHA1> " + "0" * 40 + " </BmapFileSHA1>", text)
    digest = hashlib.sha1(text.encode()).hexdigest()
    return text.replace("0" * 40, digest, 1).encode()


@needs_bmaptool
def test_reads_bmaptool_v2(image, tmp_path):
    m = bm.read_bmap(bmaptool_create(image, tmp_path / "t.bmap"))
    assert (m.version, m.checksum_type, m.image_size) == ("2.0", "sha256", image.stat().st_size)
    assert all(d and len(d) == 64 for _, _, d in m.ranges)


@needs_bmaptool
def test_reads_v13_with_sha1_and_checks_its_file_sha1(image, tmp_path):
    raw = to_v13(bmaptool_create(image, tmp_path / "t.bmap").read_bytes(), image)
    m = bm.parse_bmap(raw)
    assert (m.version, m.checksum_type) == ("1.3", "sha1")
    assert m.ranges == tuple((f, l, hashlib.sha1(image.read_bytes()[f * 4096:(l + 1) * 4096]).hexdigest())
                             for f, l, _ in m.ranges)
    broken = raw.replace(b"Count of blocks", b"Count of Blocks")
    with pytest.raises(bm.InvalidBmap, match=r"its BmapFileSHA1 is [0-9a-f]{40} but the file's checksum is"):
        bm.parse_bmap(broken, "old.bmap")


@needs_bmaptool
def test_reads_v14_and_v12_without_checksums(image, tmp_path):
    raw = bmaptool_create(image, tmp_path / "t.bmap").read_bytes()
    v14 = raw.replace(b'version="2.0"', b'version="1.4"')
    v14 = re.sub(rb"<BmapFileChecksum> [0-9a-f]+ ", b"<BmapFileChecksum> " + b"0" * 64 + b" ", v14)
    digest = hashlib.sha256(v14).hexdigest().encode()
    v14 = v14.replace(b"0" * 64, digest, 1)
    assert bm.parse_bmap(v14).checksum_type == "sha256"
    v12 = re.sub(rb' chksum="[0-9a-f]+"', b"", raw.replace(b'version="2.0"', b'version="1.2"'))
    v12 = re.sub(rb"\s*<BmapFileChecksum>.*?</BmapFileChecksum>", b"", v12)
    m = bm.parse_bmap(v12)
    assert m.checksum_type is None and all(d is None for _, _, d in m.ranges) and m.version == "1.2"


# --- malformed maps --------------------------------------------------------------------------

GOOD_HEAD = ('<?xml version="1.0" ?>\n<bmap version="2.0">\n<ImageSize> 40960 </ImageSize>\n'
             '<BlockSize> 4096 </BlockSize>\n<BlocksCount> 10 </BlocksCount>\n'
             '<MappedBlocksCount> {mapped} </MappedBlocksCount>\n<ChecksumType> sha256 </ChecksumType>\n'
             '<BmapFileChecksum> {zeros} </BmapFileChecksum>\n<BlockMap>\n{ranges}</BlockMap>\n</bmap>\n')
D = "ab" * 32


def signed(text: str) -> bytes:
    raw = text.encode()
    zeros = b"0" * 64
    digest = hashlib.sha256(raw).hexdigest().encode()
    return raw.replace(zeros, digest, 1)


def good(ranges=f'<Range chksum="{D}"> 0-1 </Range>\n<Range chksum="{D}"> 5 </Range>\n', mapped=3, **swap):
    text = GOOD_HEAD.format(mapped=mapped, zeros="0" * 64, ranges=ranges)
    for old, new in swap.items():
        text = text.replace(old.replace("_", " "), new)
    return text


def test_handmade_map_parses():
    m = bm.parse_bmap(signed(good()), "t.bmap")
    assert m.ranges == ((0, 1, D), (5, 5, D)) and m.mapped_blocks == 3
    assert m.byte_ranges() == [(0, 8192), (20480, 24576)] and m.mapped_bytes == 12288


MALFORMED = [
    (b"not xml at all", r"XML error: syntax error: line 1, column 0"),
    (signed(good()).replace(b"<bmap ", b"<bmop ").replace(b"</bmap>", b"</bmop>"),
     r"the root element is <bmop>, not <bmap>"),
    (signed(good().replace('version="2.0"', 'version="3.0"')),
     r"format version 3.0 is not supported \(kiosk reads 1.x and 2.0\)"),
    (signed(good().replace('version="2.0"', 'version="two"')), r"missing or malformed version attribute 'two'"),
    (signed(good().replace("<ImageSize> 40960 </ImageSize>\n", "")), r"<ImageSize> is missing"),
    (signed(good().replace("<BlockSize> 4096 <", "<BlockSize> 4k <")), r"<BlockSize> is '4k', not a number"),
    (signed(good().replace("<BlockSize> 4096 <", "<BlockSize> 1000 <")), r"block size 1000 is not a multiple of 512"),
    (signed(good().replace("<BlocksCount> 10 <", "<BlocksCount> 11 <")),
     r"11 blocks of 4096 bytes do not make an image of 40960 bytes"),
    (signed(good().replace("<ChecksumType> sha256 </ChecksumType>\n", "")), r"<ChecksumType> is missing"),
    (signed(good().replace("sha256", "rot13")), r"unknown checksum type 'rot13'"),
    (good().encode().replace(b"0" * 64, b"0" * 63), r"<BmapFileChecksum> '0{63}' is not a sha256 digest"),
    (signed(good()).replace(b"<BlockSize>", b"<BlockSize >"), r"its BmapFileChecksum is [0-9a-f]{64} but the "
                                                             r"file's checksum is [0-9a-f]{64} \(the file was changed"),
    (signed(good(ranges="", mapped=0).replace("<BlockMap>\n</BlockMap>\n", "")), r"<BlockMap> is missing"),
    (signed(good(ranges=f'<Range chksum="{D}"> 0..1 </Range>\n', mapped=2)),
     r"range '0..1' is not 'first-last' or a block number"),
    (signed(good(ranges=f'<Range chksum="{D}"> 3-1 </Range>\n', mapped=0)), r"range 3-1 ends before it starts"),
    (signed(good(ranges=f'<Range chksum="{D}"> 8-10 </Range>\n', mapped=3)),
     r"range 8-10 goes past the image's last block 9"),
    (signed(good(ranges=f'<Range chksum="{D}"> 0-4 </Range>\n<Range chksum="{D}"> 4-5 </Range>\n', mapped=7)),
     r"range 4-5 overlaps or precedes the range before it"),
    (signed(good(ranges='<Range chksum="abc"> 0 </Range>\n', mapped=1)),
     r"range 0-0 has checksum 'abc', not a sha256 digest"),
    (signed(good(mapped=4)), r"<MappedBlocksCount> says 4 blocks but the ranges hold 3"),
    # Hostile values (issue 14): each one line naming the field, never an internal error.
    (signed(good().replace("sha256", "shake_128")), r"unknown checksum type 'shake_128' \(kiosk reads sha1 or sha256\)"),
    (signed(good().replace("sha256", "shake_256")), r"unknown checksum type 'shake_256'"),
    (signed(good().replace("sha256", "md5-sha1")), r"unknown checksum type 'md5-sha1'"),
    (signed(good().replace("<ImageSize> 40960 <", "<ImageSize> -40960 <")), r"<ImageSize> is '-40960', not a number"),
    (signed(good().replace("<ImageSize> 40960 <", "<ImageSize> 4\u00b2 <")), r"<ImageSize> is '4\u00b2', not a number"),
    (signed(good().replace("<ImageSize> 40960 <", "<ImageSize> 1e5 <")), r"<ImageSize> is '1e5', not a number"),
    (signed(good().replace("<ImageSize> 40960 <", "<ImageSize> NaN <")), r"<ImageSize> is 'NaN', not a number"),
    (signed(good().replace("<ImageSize> 40960 <", f"<ImageSize> {'9' * 5000} <")),
     r"<ImageSize> is '9{70}\.\.\.', not a number of at most 20 digits"),
    (signed(good().replace("<BlocksCount> 10 <", "<BlocksCount> -1 <")), r"<BlocksCount> is '-1', not a number"),
    (signed(good().replace("<BlocksCount> 10 <", "<BlocksCount> ten <")), r"<BlocksCount> is 'ten', not a number"),
    (signed(good().replace("<BlockSize> 4096 <", "<BlockSize> -4096 <")), r"<BlockSize> is '-4096', not a number"),
    (signed(good().replace("<BlockSize> 4096 <", "<BlockSize> 0 <")), r"block size 0 is not a multiple of 512"),
    (signed(good().replace("<MappedBlocksCount> 3 <", "<MappedBlocksCount> inf <")),
     r"<MappedBlocksCount> is 'inf', not a number"),
    (signed(good().replace('version="2.0"', f'version="{"1" * 5000}.0"')), r"missing or malformed version attribute"),
    (signed(good(ranges=f'<Range chksum="{D}"> {"1" * 5000} </Range>\n', mapped=1)),
     r"range '1{70}\.\.\.' is not 'first-last' or a block number"),
    (signed(good(ranges=f'<Range chksum="{D}"> \u0661 </Range>\n', mapped=1)),
     r"range '\u0661' is not 'first-last' or a block number"),
]


@pytest.mark.parametrize("raw, message", MALFORMED, ids=[m[1][:40] for m in MALFORMED])
def test_malformed_maps_are_named(raw, message, tmp_path):
    path = tmp_path / "bad.bmap"
    path.write_bytes(raw)
    with pytest.raises(bm.InvalidBmap) as info:
        bm.read_bmap(path)
    text = str(info.value)
    assert info.value.exit_code == 2
    assert "\n" not in text
    assert re.fullmatch(rf"{re.escape(str(path))}: not a valid block map: {message}.*; rebuild the image "
                        rf"\(kiosk build\) or recreate the map with 'bmaptool create IMAGE -o IMAGE.bmap'", text), text


def test_a_missing_map_is_the_users_error(tmp_path):
    """A --bmap that is not there is bad input (exit 2), as a missing image is."""
    with pytest.raises(KioskError) as info:
        bm.read_bmap(tmp_path / "none.bmap")
    assert str(info.value).startswith(f"cannot read the block map {tmp_path / 'none.bmap'}: No such file or directory; ")
    assert info.value.exit_code == 2


def test_human_size():
    assert [human_size(n) for n in (0, 1, 1023, 1024, 1536, 64 * MiB, 3 << 30)] == \
        ["0 bytes", "1 byte", "1023 bytes", "1.0 KiB", "1.5 KiB", "64.0 MiB", "3.0 GiB"]


# ---------------------------------------------------------------------------------------------
# Hostile files given as the map (issue 14): a FIFO would block the open forever, /dev/zero never
# ends (MemoryError), a huge file is not a map. Each is refused before it is read, on one line.

def _hostile_map(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / "hostile.bmap"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dev-zero":
        return Path("/dev/zero")
    elif kind == "directory":
        path.mkdir()
    elif kind == "huge":
        with open(path, "wb") as f:
            f.truncate(bm.MAX_BMAP_BYTES + 1)
    return path


@pytest.mark.parametrize("kind, says", [
    ("fifo", "the block map must be a regular file, not a FIFO (named pipe)"),
    ("dev-zero", "the block map must be a regular file, not a character device"),
    ("directory", "the block map must be a regular file, not a directory"),
    ("huge", "the block map is larger than 16 MiB"),
])
def test_a_map_that_is_not_a_small_regular_file_is_refused_unread(kind, says, tmp_path):
    path = _hostile_map(tmp_path, kind)
    done = {}

    def read():
        try:
            bm.read_bmap(path)
        except KioskError as exc:
            done["error"] = exc
        except BaseException as exc:   # noqa: BLE001 - any other outcome is the failure being tested for
            done["other"] = exc

    import threading
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(10)
    if reader.is_alive():   # blocked in open(): unblock it so the test run can end
        with open(path, "wb"):
            pass
        pytest.fail(f"reading a {kind} as a block map hung")
    assert "other" not in done, repr(done.get("other"))
    error = done["error"]
    assert error.exit_code == 2 and "\n" not in str(error)
    assert str(error).startswith(f"{path}: {says}"), str(error)


def test_sha256_file_hashes_holes_as_zeros_without_reading_them(tmp_path):
    """kiosk.core.files.sha256_file skips holes (SEEK_DATA/SEEK_HOLE) and gives hashlib's digest of every byte."""
    import hashlib
    import random

    from kiosk.core.files import sha256_file

    rng = random.Random(7)
    for size in (0, 1, 4096, 5 * 2**20 + 7, 64 * 2**20):
        path = tmp_path / f"sparse-{size}"
        with open(path, "wb") as f:
            f.truncate(size)
            for _ in range(4 if size else 0):
                offset = rng.randrange(size)
                f.seek(offset)
                f.write(rng.randbytes(min(rng.randint(1, 3 * 2**20), size - offset)))
        whole = hashlib.sha256(path.read_bytes()).hexdigest()
        assert sha256_file(path) == whole and sha256_file(path, chunk=4096) == whole, size
    assert sha256_file("/dev/null") == hashlib.sha256(b"").hexdigest()   # a device: read through
