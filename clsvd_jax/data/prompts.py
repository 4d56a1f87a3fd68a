"""Prompt templates (docs/design.md §8).

The default is O-LoRA's prompt, character for character, so that accuracies compare with the literature:
``"Task:<group>\\nDataset:<name>\\n" + instruction + "Option: <labels joined by ', '> \\n" + sentence + "\\nAnswer:"``
(the space before the newline after the options is part of it).

A template is a ``str.format`` string over ``{group} {name} {instruction} {options} {sentence}``. The sentence is
never passed through ``format`` (it may contain braces): a template is split at ``{sentence}`` into a prefix and a
suffix, which is also what lets the tokeniser cut an over-long sentence while the ``Answer:`` cue survives.
"""

from __future__ import annotations

import string

from clsvd_jax.data.tasks import DataError, Example, Task

DEFAULT_TEMPLATE = "Task:{group}\nDataset:{name}\n{instruction}Option: {options} \n{sentence}\nAnswer:"
# Free-form tasks (no label set): the same prompt without the options line.
FREEFORM_TEMPLATE = "Task:{group}\nDataset:{name}\n{instruction}{sentence}\nAnswer:"
# TRACE-style records already hold the full prompt.
IDENTITY_TEMPLATE = "{sentence}"

TEMPLATE_FIELDS = ("group", "name", "instruction", "options", "sentence")

# O-LoRA's zero-shot instructions per task group (the CL_Benchmark instruction_config.json), used when a task
# read from TFDS or HF names one of these groups and gives no instruction of its own.
OLORA_INSTRUCTIONS = {
  "NLI": 'What is the logical relationship between the "sentence 1" and the "sentence 2"? Choose one from the '
         "option.\n",
  "QQP": 'Whether the "first sentence" and the "second sentence" have the same meaning? Choose one from the option.\n',
  "SC": "What is the sentiment of the following paragraph? Choose one from the option.\n",
  "TC": "What is the topic of the following paragraph? Choose one from the option.\n",
  "BoolQA": "According to the following passage, is the question true or false? Choose one from the option.\n",
  "MultiRC": "According to the following passage and question, is the candidate answer true or false? Choose one "
             "from the option.\n",
  "WiC": "Given a word and two sentences, whether the word is used with the same sense in both sentence? Choose one "
         "from the option.\n",
}
GENERIC_INSTRUCTION = "Choose one from the option.\n"


def default_template(labels: tuple[str, ...] | None, source: str) -> str:
  """The template a task gets when its config names none."""
  if source == "trace":
    return IDENTITY_TEMPLATE
  return DEFAULT_TEMPLATE if labels else FREEFORM_TEMPLATE


def check_template(template: str, where: str = "template") -> None:
  """Raises ``DataError`` unless ``template`` has exactly one ``{sentence}`` and only known fields."""
  try:
    fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
  except ValueError as e:
    raise DataError(f"{where}: {template!r} is not a valid format string ({e}); write literal braces as {{{{ }}}}") \
      from None
  unknown = sorted({f for f in fields if f not in TEMPLATE_FIELDS})
  if unknown:
    raise DataError(f"{where}: unknown field(s) {unknown} in {template!r}; allowed: "
                    f"{', '.join('{' + f + '}' for f in TEMPLATE_FIELDS)}")
  if fields.count("sentence") != 1:
    raise DataError(f"{where}: {template!r} must contain {{sentence}} exactly once")


def prompt_parts(task: Task) -> tuple[str, str]:
  """The task's prompt text before and after the sentence (constant for all examples of a task)."""
  check_template(task.template, f"task {task.name!r} template")
  head, tail = task.template.split("{sentence}")
  values = {"group": task.group, "name": task.name, "instruction": task.instruction, "options": task.options}
  return head.format(**values), tail.format(**values)


def build_prompt(task: Task, example: Example | str) -> str:
  """The full prompt of one example (or of a raw sentence string)."""
  head, tail = prompt_parts(task)
  sentence = example.sentence if isinstance(example, Example) else example
  return head + sentence + tail
