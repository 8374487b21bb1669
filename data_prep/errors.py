"""Errors that the command line turns into exit status 2 with a one-line message."""

from __future__ import annotations


class DataError(Exception):
    """Bad input: names the file, the line (1-based, when known) and the field that is wrong."""

    def __init__(self, file: str, line: int | None, field: str | None, problem: str) -> None:
        self.file, self.line, self.field, self.problem = str(file), line, field, problem
        super().__init__(str(self))

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}, line {self.line}"
        if self.field is not None:
            where += f", field '{self.field}'"
        return f"{where}: {self.problem}"


class EmptyResultError(Exception):
    """A step kept nothing (say, a time window with no interactions): a clear error, not an empty dataset."""

    def __init__(self, step: str, detail: str) -> None:
        self.step, self.detail = step, detail
        super().__init__(f"step '{step}' left nothing: {detail}")
