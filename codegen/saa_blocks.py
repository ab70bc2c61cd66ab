"""Block geometry shared by SAA's Triton and Gluon kernels: which keys a query row sees, which key blocks
a query block sees in full, in part, or holds its diagonal in, and which query block a program takes."""

import triton
import triton.language as tl


@triton.jit
def keys_seen(row, KEY_OFFSET, SEQ_K):
    """Causal: how many keys query row ``row`` sees (key j sees i when j <= i + KEY_OFFSET), the first ones."""
    return tl.minimum(tl.maximum(row + KEY_OFFSET + 1, 0), SEQ_K)


@triton.jit
def allowed_blocks(last_row, KEY_OFFSET, SEQ_K, BLOCK_N: tl.constexpr):
    """Causal: key blocks holding a key visible to query row last_row."""
    return (keys_seen(last_row, KEY_OFFSET, SEQ_K) + BLOCK_N - 1) // BLOCK_N


@triton.jit
def full_blocks(first_row, KEY_OFFSET, SEQ_K, NUM_N, BLOCK_N: tl.constexpr):
    """Causal: key blocks whose keys are all visible to query row first_row (and so to every later row);
    all NUM_N when it sees every key, the ragged last block included."""
    visible = keys_seen(first_row, KEY_OFFSET, SEQ_K)
    return tl.where(visible == SEQ_K, NUM_N, visible // BLOCK_N)


@triton.jit
def diagonal_block(last_row, KEY_OFFSET, SEQ_Q, SEQ_K, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr):
    """The key block holding query row last_row's position: its last visible key when causal, else the
    bottom-right aligned position."""
    if CAUSAL:
        return allowed_blocks(last_row, KEY_OFFSET, SEQ_K, BLOCK_N) - 1
    return tl.minimum(tl.maximum(last_row + SEQ_K - SEQ_Q, 0), SEQ_K - 1) // BLOCK_N


@triton.jit
def keys_behind(first_key, SEQ_K, RUN: tl.constexpr):
    """Keys of the run of RUN keys from first_key that exist (0 past SEQ_K)."""
    return tl.minimum(tl.maximum(SEQ_K - first_key, 0), RUN)


@triton.jit
def query_block_program(pid, NUM_M, LAST_FIRST: tl.constexpr):
    """``(query block, batch·head)`` of program ``pid`` of a 1-D grid of ``NUM_M`` × batch·heads: query blocks
    in order, one head after another; or with LAST_FIRST, every head's last query block, then every
    head's one before, and so on."""
    if LAST_FIRST:
        heads = tl.num_programs(0) // NUM_M
        return NUM_M - 1 - pid // heads, pid % heads
    return pid % NUM_M, pid // NUM_M
