"""When a temperature means greedy decoding. Torch-free: the router reads it as well as the loops."""

# below this a temperature is greedy: dividing logits by ~1e-300 overflows to inf and NaN probabilities
MIN_TEMPERATURE = 1e-4


def is_greedy(temperature: float) -> bool:
    return temperature < MIN_TEMPERATURE
