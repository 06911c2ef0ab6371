"""What tokens cost: the ``prices:`` section of the configuration, per model, in US dollars per
million input and output tokens, as providers publish them.

One :class:`PriceTable` serves every place that turns tokens into money: the batch budget
(``cometkit batch --max-cost``), the per-model summary of ``stdout_metrics`` and
``cometkit report``. A model is found by its name as requested; an answer that names a dated
snapshot of it (``gpt-4o-mini-2024-07-18``, ``claude-3-5-haiku-20241022``) is priced as the
model it is a snapshot of, unless the table names the snapshot itself.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Optional

from .options import Option

__all__ = ["PRICE_OPTIONS", "ModelPrice", "PriceTable", "TOKENS_PER_PRICE_UNIT", "format_usd"]

#: Prices are per million tokens.
TOKENS_PER_PRICE_UNIT = 1_000_000

#: The keys of one model's entry under ``prices:``.
PRICE_OPTIONS: dict[str, Option] = {
    "input": Option(
        "float", minimum=0, required=True,
        help="US dollars per million input (prompt) tokens.", example=0.15),
    "output": Option(
        "float", minimum=0, required=True,
        help="US dollars per million output (completion) tokens; 0 for a model that "
             "answers none (embeddings).", example=0.6),
}

#: A dated snapshot suffix: ``-2024-07-18``, ``-20241022``, ``-0613``.
_SNAPSHOT = re.compile(r"-(?:\d{4}-\d{2}-\d{2}|\d{8}|\d{4})$")


def format_usd(amount: float, *, sign: bool = True) -> str:
    """US dollars to the millionth below $1,000 (a batch of small calls costs fractions of a
    cent), to the cent above: ``$0.001234``, ``$1,234.50``."""
    text = f"{amount:.6f}" if abs(amount) < 1000 else f"{amount:,.2f}"
    return f"${text}" if sign else text


@dataclass(frozen=True)
class ModelPrice:
    """One model's price, in US dollars per million tokens."""

    input_usd_per_mtok: float
    output_usd_per_mtok: float

    def cost_usd(self, input_tokens: int, output_tokens: int) -> float:
        """What ``input_tokens`` and ``output_tokens`` cost, in US dollars."""
        return (input_tokens * self.input_usd_per_mtok
                + output_tokens * self.output_usd_per_mtok) / TOKENS_PER_PRICE_UNIT


class PriceTable:
    """Prices by model name, read-only.

    :param prices: the validated ``prices:`` section (model -> ``{input, output}``), or
        model -> :class:`ModelPrice`.
    """

    __slots__ = ("_prices",)

    def __init__(self, prices: Optional[Mapping[str, Any]] = None) -> None:
        table: dict[str, ModelPrice] = {}
        for model, price in (prices or {}).items():
            if not isinstance(price, ModelPrice):
                price = ModelPrice(float(price["input"]), float(price["output"]))
            table[str(model)] = price
        self._prices = table

    def __len__(self) -> int:
        return len(self._prices)

    def __iter__(self) -> Iterator[str]:
        return iter(self._prices)

    def __repr__(self) -> str:
        return f"PriceTable({sorted(self._prices)})"

    def price_of(self, model: Optional[str]) -> Optional[ModelPrice]:
        """The price of ``model``: its own entry, else that of the model it is a dated
        snapshot of; ``None`` when neither is listed."""
        if not model:
            return None
        price = self._prices.get(model)
        if price is None:
            base = _SNAPSHOT.sub("", model)
            if base != model:
                price = self._prices.get(base)
        return price

    def cost_usd(self, model: Optional[str], input_tokens: int,
                 output_tokens: int) -> Optional[float]:
        """What the tokens cost with ``model``'s price; ``None`` when it has none."""
        price = self.price_of(model)
        return None if price is None else price.cost_usd(input_tokens, output_tokens)
