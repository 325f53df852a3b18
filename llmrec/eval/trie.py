"""A prefix trie over the tokenised titles of the catalog, for constrained decoding.

Every title is tokenised exactly as the SFT data tokenises a completion (after the prompt's fixed ending, the
"anchor", and followed by EOS), so the trie's paths are the token sequences the model was trained to write.
Walking a prefix costs O(prefix length) and the allowed next tokens of a node are precomputed, so a decoding
step costs the same whatever the catalog size.

Excluding items (a user's history) uses an overlay: `banned_counts(items)` counts the banned titles below each
node, and a child is allowed while some title below it is not banned. That is exact (no beam ever enters a
branch that only leads to banned titles) and costs O(banned items × title length) per user.
"""

from __future__ import annotations

from collections.abc import Iterable

from llmrec.errors import LLMRecError


class CatalogTrie:
    def __init__(self, sequences: dict[str, list[int]]):
        self.children: list[dict[int, int]] = [{}]
        self.items_below: list[int] = [0]
        self.item_at: dict[int, str] = {}
        self.paths: dict[str, list[int]] = {}
        self.depth = 0
        for item, tokens in sequences.items():
            self._insert(item, tokens)
        self.allowed_tokens = [list(children) for children in self.children]

    def _insert(self, item: str, tokens: list[int]) -> None:
        node, path = 0, [0]
        for token in tokens:
            nxt = self.children[node].get(token)
            if nxt is None:
                nxt = len(self.children)
                self.children[node][token] = nxt
                self.children.append({})
                self.items_below.append(0)
            node = nxt
            path.append(node)
        if node in self.item_at:
            raise LLMRecError(
                f"items {self.item_at[node]!r} and {item!r} tokenise to the same title; titles must differ as tokens."
            )
        if self.children[node]:
            raise LLMRecError(f"the title of item {item!r} is a token prefix of another title and has no end token.")
        self.item_at[node] = item
        for visited in path:
            self.items_below[visited] += 1
        self.paths[item] = path
        self.depth = max(self.depth, len(tokens))

    @classmethod
    def from_titles(cls, tokenizer, titles: dict[str, str], anchor: str) -> CatalogTrie:
        """Tokenise `anchor + title + EOS` for every title and keep the part after the anchor's tokens."""
        anchor_ids = tokenizer(anchor)["input_ids"]
        items = list(titles)
        encoded = tokenizer([anchor + titles[item] + tokenizer.eos_token for item in items])["input_ids"]
        sequences = {}
        for item, ids in zip(items, encoded):
            if ids[: len(anchor_ids)] != anchor_ids:
                raise LLMRecError(
                    f"the prompt template's ending {anchor!r} does not end on a token boundary before the title "
                    f"{titles[item]!r}, so completions cannot be matched to catalog items. End the template with a "
                    "newline or another separator.",
                    "data.task.prompt_template",
                )
            tail = ids[len(anchor_ids) :]
            if not tail or tail[-1] != tokenizer.eos_token_id:
                tail = [*tail, tokenizer.eos_token_id]
            sequences[item] = tail
        return cls(sequences)

    def __len__(self) -> int:
        return len(self.item_at)

    def walk(self, tokens: Iterable[int]) -> int | None:
        node = 0
        for token in tokens:
            node = self.children[node].get(token)
            if node is None:
                return None
        return node

    def banned_counts(self, items: Iterable[str]) -> dict[int, int]:
        counts: dict[int, int] = {}
        for item in set(items):
            for node in self.paths.get(item, ()):
                counts[node] = counts.get(node, 0) + 1
        return counts

    def allowed(self, tokens: Iterable[int], banned: dict[int, int] | None = None) -> list[int]:
        """Tokens that extend `tokens` towards a title that is not banned ([] when none)."""
        node = self.walk(tokens)
        if node is None:
            return []
        if not banned or node not in banned:
            return self.allowed_tokens[node]
        return [
            token
            for token, child in self.children[node].items()
            if self.items_below[child] > banned.get(child, 0)
        ]

    def item_of(self, tokens: Iterable[int]) -> str | None:
        """The item whose full sequence (EOS included) is `tokens`, or None."""
        node = self.walk(tokens)
        return None if node is None else self.item_at.get(node)

    def available(self, banned: dict[int, int] | None = None) -> int:
        return self.items_below[0] - (banned or {}).get(0, 0)
