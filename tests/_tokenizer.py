"""SD's CLIP tokenizer built offline from the BPE merges that open_clip ships in its wheel."""

import functools
import gzip
import importlib.resources

from open_clip.tokenizer import bytes_to_unicode
from transformers import CLIPTokenizer

NUM_MERGES = 49152 - 256 - 2  # the merges CLIP uses; ids 49406/49407 are then the special tokens


@functools.lru_cache(maxsize=1)
def clip_tokenizer() -> CLIPTokenizer:
    """The 49408-token CLIP tokenizer (BOS 49406, EOS = pad 49407, 77 positions), as open_clip's
    SimpleTokenizer builds its vocabulary. transformers 5 ignores vocab_file=: pass vocab= and
    merges= (a list of pairs; "a b" strings are rejected)."""
    bpe = importlib.resources.files("open_clip") / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.decompress(bpe.read_bytes()).decode("utf-8").split("\n")[1 : NUM_MERGES + 1]
    merges = [tuple(line.split()) for line in lines]
    byte_chars = list(bytes_to_unicode().values())
    words = [*byte_chars, *(char + "</w>" for char in byte_chars), *("".join(merge) for merge in merges)]
    words += ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(
        vocab={word: index for index, word in enumerate(words)},
        merges=merges,
        model_max_length=77,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
