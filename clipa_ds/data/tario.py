"""Minimal streaming tar reader/writer for webdataset shards, strict about damage.

Python's `tarfile` ends an archive *silently* at a corrupt header that is not the first one,
which is how shards lose samples unnoticed. This reader checks every header checksum and
raises `TarCorrupt` / `TarTruncated` instead, tracks the byte offset of every sample (so a
reader can resume mid-shard with a ranged read), and needs only forward reads.

Supported members: regular files (ustar, GNU long names, pax `path=`); directories and other
types are skipped. Samples are consecutive members sharing a key (webdataset convention: the
path up to the first dot of the file name).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import BinaryIO, Iterator

BLOCK = 512


class TarError(Exception):
    """A damaged shard; `samples` is how many complete samples came before the damage."""

    def __init__(self, message: str, samples: int = 0, member_name: str | None = None) -> None:
        super().__init__(message)
        self.samples = samples
        self.member_name = member_name  # the member whose data was cut, when its header was valid


class TarCorrupt(TarError):
    pass


class TarTruncated(TarError):
    pass


@dataclass
class RawSample:
    key: str
    offset: int  # byte offset of the sample's first header inside the shard
    end: int = 0  # byte offset just after its last member (where the next sample starts)
    files: dict[str, bytes] = field(default_factory=dict)  # extension ("jpg", "txt") -> bytes


def _octal(field_bytes: bytes) -> int:
    if field_bytes[:1] in (b"\x80", b"\xff"):  # GNU base-256 for big values
        return int.from_bytes(field_bytes[1:], "big")
    text = field_bytes.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def header(name: str, size: int, typeflag: bytes = b"0", mtime: int = 0) -> bytes:
    """A ustar header block for `name` (<= 100 bytes) of `size` bytes."""
    raw = name.encode()
    if len(raw) > 100:
        raise ValueError(f"tar member name too long for ustar: {name!r}")
    block = bytearray(BLOCK)
    block[0 : len(raw)] = raw
    block[100:108] = b"0000644\0"
    block[108:116] = b"0000000\0"
    block[116:124] = b"0000000\0"
    block[124:136] = b"%011o\0" % size
    block[136:148] = b"%011o\0" % mtime
    block[148:156] = b" " * 8
    block[156:157] = typeflag
    block[257:265] = b"ustar\x0000"
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def member(name: str, data: bytes) -> bytes:
    """Header + data + padding for one regular file."""
    pad = (-len(data)) % BLOCK
    return header(name, len(data)) + data + b"\0" * pad


END_OF_ARCHIVE = b"\0" * (2 * BLOCK)


def split_key(path: str) -> tuple[str, str]:
    """`dir/abc.seg.jpg` -> (`dir/abc`, `seg.jpg`), webdataset's key/extension split."""
    slash = path.rfind("/")
    dot = path.find(".", slash + 1)
    if dot < 0:
        return path, ""
    return path[:dot], path[dot + 1 :].lower()


class _Reader:
    def __init__(self, stream: BinaryIO, offset: int) -> None:
        self.stream = stream
        self.offset = offset

    def read_exact(self, n: int) -> bytes:
        chunks = []
        left = n
        while left:
            chunk = self.stream.read(left)
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        data = b"".join(chunks)
        self.offset += len(data)
        return data


def iter_members(stream: BinaryIO, start_offset: int = 0) -> Iterator[tuple[str, int, int, bytes]]:
    """Yield (path, header offset, end offset, data) of regular files; raise TarCorrupt/TarTruncated."""
    reader = _Reader(stream, start_offset)
    long_name: str | None = None
    while True:
        at = reader.offset
        block = reader.read_exact(BLOCK)
        if len(block) == 0:
            # Clean EOF without the zero blocks: tolerated (some writers omit them).
            return
        if len(block) < BLOCK:
            raise TarTruncated(f"truncated header at byte {at}")
        if block.count(0) == BLOCK:
            return  # end-of-archive marker
        stored = _octal(block[148:156])
        computed = sum(block[:148]) + 8 * 32 + sum(block[156:])
        if stored != computed:
            raise TarCorrupt(f"bad header checksum at byte {at}")
        try:
            size = _octal(block[124:136])
        except ValueError:
            raise TarCorrupt(f"bad size field at byte {at}") from None
        typeflag = block[156:157]
        data = reader.read_exact(size)
        pad = (-size) % BLOCK
        if len(data) < size or (pad and len(reader.read_exact(pad)) < pad):
            name = long_name or block[0:100].split(b"\0", 1)[0].decode("utf-8", "replace")
            raise TarTruncated(f"truncated member at byte {at}: {len(data)} of {size} bytes", member_name=name)
        if typeflag == b"L":  # GNU long name for the next member
            long_name = data.split(b"\0", 1)[0].decode("utf-8", "replace")
            continue
        if typeflag == b"x":  # pax extended header: only `path` matters here
            for line in data.decode("utf-8", "replace").splitlines():
                _, _, kv = line.partition(" ")
                if kv.startswith("path="):
                    long_name = kv[len("path=") :]
            continue
        if typeflag not in (b"0", b"\0", b"7"):
            long_name = None
            continue  # directories, links, global pax headers
        if long_name is not None:
            name, long_name = long_name, None
        else:
            name = block[0:100].split(b"\0", 1)[0].decode("utf-8", "replace")
            if block[257:262] == b"ustar" and block[345]:
                prefix = block[345:500].split(b"\0", 1)[0].decode("utf-8", "replace")
                name = f"{prefix}/{name}"
        yield name, at, reader.offset, data


def iter_samples(stream: BinaryIO, start_offset: int = 0) -> Iterator[RawSample]:
    """Group members into samples. On damage, the incomplete last sample is dropped and the
    error carries the number of complete samples yielded before it."""
    current: RawSample | None = None
    count = 0
    try:
        for name, at, end, data in iter_members(stream, start_offset):
            key, ext = split_key(name)
            if current is not None and key != current.key:
                yield current
                count += 1
                current = None
            if current is None:
                current = RawSample(key=key, offset=at)
            current.files[ext] = data
            current.end = end
    except TarError as err:
        # A valid header with a new key proves the previous sample was complete.
        if current is not None and err.member_name is not None and split_key(err.member_name)[0] != current.key:
            yield current
            count += 1
        err.samples = count
        raise
    if current is not None:
        yield current
