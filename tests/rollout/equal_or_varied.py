"""A reward for the dynamic-sampling tests: constant for prompts whose answer is "same", else a checksum of the
response in five levels (four samples of a prompt all land on one level about once in 125 groups)."""


def reward(response: str, answer: str) -> float:
    return 1.0 if answer == "same" else (sum(map(ord, response)) % 5) / 4
