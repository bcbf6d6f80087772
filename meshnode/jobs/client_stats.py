"""What a light client has done since it started: jobs, tokens, spend, errors by code.

Counters only ever grow (they feed Prometheus counters); `last_tokens_per_s` is the
decode rate of the latest completed job. Error codes come from `JobError.code` (a
provider may send any short string), so the table keeps at most `MAX_ERROR_CODES`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from meshnode.core.messages import Usage

# Codes are a small fixed set in honest providers; a hostile one must not grow this map.
MAX_ERROR_CODES = 32
OTHER_ERROR = "other"


@dataclass
class ClientStats:
    jobs_started: int = 0
    jobs_completed: int = 0
    jobs_failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    spent_nanoton: int = 0
    last_tokens_per_s: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)

    def started(self) -> None:
        self.jobs_started += 1

    def completed(self, usage: Usage, ttft_s: float, elapsed_s: float) -> None:
        self.jobs_completed += 1
        self.prompt_tokens += usage.prompt_tokens
        self.completion_tokens += usage.completion_tokens
        self.spent_nanoton += usage.cost_nanoton
        decode_s = elapsed_s - ttft_s
        if usage.completion_tokens > 1 and decode_s > 0:
            self.last_tokens_per_s = (usage.completion_tokens - 1) / decode_s

    def failed(self, code: str) -> None:
        self.jobs_failed += 1
        if code not in self.errors and len(self.errors) >= MAX_ERROR_CODES:
            code = OTHER_ERROR
        self.errors[code] = self.errors.get(code, 0) + 1
