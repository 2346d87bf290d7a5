"""Checks shared by the towers."""


def check_choice(what: str, value: str, accepted: tuple[str, ...]) -> None:
  """Raises a ValueError naming the accepted values if `value` is not one of them."""
  if value not in accepted:
    raise ValueError(f'Unknown {what} {value!r}; accepted: {", ".join(accepted)}.')
