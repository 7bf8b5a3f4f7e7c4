"""Chained block hashes (contracts.block_hash): deterministic across calls and processes, chained so
a change in one block changes every later hash, only full blocks hashed, salt and model id
separate the chains, incremental extension equals hashing from scratch, and the module is
torch-free (the router imports it)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from contracts.block_hash import hash_block, hash_blocks, prompt_block_hashes, root_hash
from contracts.sampling_params import SamplingParams
from engine.sequence import Sequence
from tests.conftest import prompt_ids

REPO_ROOT = Path(__file__).resolve().parents[2]
BLOCK_SIZE = 4
MODEL = "dummy:tiny"


def run_python(code: str, **env: str) -> str:
    """Run `code` in a fresh interpreter at the repository root; return its stdout."""
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return result.stdout.strip()


def test_same_hashes_on_every_call() -> None:
    tokens = prompt_ids(1, 19)
    first = prompt_block_hashes(tokens, BLOCK_SIZE, MODEL, "salt")
    second = prompt_block_hashes(list(tokens), BLOCK_SIZE, MODEL, "salt")
    assert first == second
    assert len(first) == 4
    assert all(isinstance(h, bytes) and len(h) == 16 for h in first)
    assert len(set(first)) == 4


def test_pinned_digests() -> None:
    """The router and every engine must agree: changing the scheme needs a new version tag."""
    assert root_hash(MODEL).hex() == "7a68e06123bebd243244f3704ca41810"
    assert root_hash(MODEL, "tenant-a").hex() == "f166ce7c919b5017114f20468bf9318e"
    hashes = prompt_block_hashes(list(range(1, 9)), BLOCK_SIZE, MODEL)
    assert hashes[1].hex() == "2bfa3a23070346b98e2b7dd7487ec66f"


@pytest.mark.parametrize("hash_seed", ["0", "12345"])
def test_same_digest_in_another_process(hash_seed: str) -> None:
    tokens = prompt_ids(2, 13)
    expected = prompt_block_hashes(tokens, BLOCK_SIZE, MODEL, "tenant")[-1].hex()
    code = (
        "from contracts.block_hash import prompt_block_hashes\n"
        f"print(prompt_block_hashes({tokens!r}, {BLOCK_SIZE}, {MODEL!r}, 'tenant')[-1].hex())"
    )
    assert run_python(code, PYTHONHASHSEED=hash_seed) == expected


@pytest.mark.parametrize(
    ("position", "first_changed_block"), [(0, 0), (3, 0), (4, 1), (9, 2), (11, 2)]
)
def test_changing_a_token_changes_its_block_and_every_later_one(
    position: int, first_changed_block: int
) -> None:
    tokens = prompt_ids(3, 12)
    changed = list(tokens)
    changed[position] = (changed[position] + 1) % 512
    before = prompt_block_hashes(tokens, BLOCK_SIZE, MODEL)
    after = prompt_block_hashes(changed, BLOCK_SIZE, MODEL)
    assert len(before) == len(after) == 3
    for i in range(3):
        assert (before[i] == after[i]) == (i < first_changed_block), i


def test_block_hash_depends_on_parent() -> None:
    tokens = [5, 6, 7, 8]
    assert hash_block(root_hash("a"), tokens) != hash_block(root_hash("b"), tokens)
    assert hash_block(root_hash("a"), tokens) == hash_block(root_hash("a"), tokens)


@pytest.mark.parametrize(("num_tokens", "num_hashes"), [(0, 0), (3, 0), (4, 1), (7, 1), (8, 2)])
def test_only_full_blocks_are_hashed(num_tokens: int, num_hashes: int) -> None:
    tokens = prompt_ids(4, num_tokens)
    hashes = hash_blocks(tokens, BLOCK_SIZE, root_hash(MODEL))
    assert len(hashes) == num_hashes
    # The partial tail is ignored: the same as hashing the full blocks alone.
    full_part = tokens[: num_hashes * BLOCK_SIZE]
    assert hash_blocks(full_part, BLOCK_SIZE, root_hash(MODEL)) == hashes


def test_salt_and_model_id_change_the_root() -> None:
    roots = [
        root_hash("model-a"),
        root_hash("model-b"),
        root_hash("model-a", "tenant-1"),
        root_hash("model-a", "tenant-2"),
        root_hash("model-b", "tenant-1"),
        # Length-prefixed parts: moving a character across the boundary is a different root.
        root_hash("model-at", "enant-1"),
    ]
    assert len(set(roots)) == len(roots)
    tokens = prompt_ids(5, 8)
    chains = [hash_blocks(tokens, BLOCK_SIZE, root) for root in roots]
    all_hashes = [h for chain in chains for h in chain]
    assert len(set(all_hashes)) == len(all_hashes), "salted chains must be disjoint"
    assert prompt_block_hashes(tokens, BLOCK_SIZE, "model-a", "tenant-1") == chains[2]


@pytest.mark.parametrize("num_hashed", [0, 1, 2, 4, 5])
def test_incremental_extension_equals_hashing_from_scratch(num_hashed: int) -> None:
    tokens = prompt_ids(6, 22)
    root = root_hash(MODEL, "s")
    full = hash_blocks(tokens, BLOCK_SIZE, root)
    assert len(full) == 5
    head = full[:num_hashed]
    parent = head[-1] if head else root
    tail = hash_blocks(tokens, BLOCK_SIZE, parent, num_hashed_blocks=num_hashed)
    assert head + tail == full


def test_sequence_extends_its_chain_lazily() -> None:
    tokens = prompt_ids(7, 30)
    root = root_hash(MODEL)
    seq = Sequence("r", tokens[:5], SamplingParams(), root)
    assert seq.full_block_hashes(BLOCK_SIZE) == hash_blocks(tokens[:5], BLOCK_SIZE, root)
    for token in tokens[5:]:
        seq.append_token(token)
        seq.full_block_hashes(BLOCK_SIZE)
    assert seq.full_block_hashes(BLOCK_SIZE) == hash_blocks(tokens, BLOCK_SIZE, root)
    assert len(seq.block_hashes) == 7


def test_module_is_torch_free() -> None:
    code = "import sys\nimport contracts.block_hash\nprint('torch' in sys.modules)"
    assert run_python(code) == "False"
