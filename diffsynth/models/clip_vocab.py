"""CLIP's byte-level BPE alphabet, shared by the real tokenizer (convert.clip_tokenizer, from the shipped merges)
and the tiny test tokenizer (tiny.write_tokenizer)."""


def byte_alphabet():
    """CLIP's byte-level alphabet: every byte maps to a printable character."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]
