"""Checked exercises cut from the stages: `python -m exercises --help`.

The stages are the reference solutions. A region of a stage's code between
`# exercise mN.K begin` and `# exercise mN.K end` is one exercise's code: `start` blanks
it in a workspace copy, `check` runs that exercise's tests on the copy. The catalog is
`exercises/stages/`, the tests `exercises/checks/`.
"""
