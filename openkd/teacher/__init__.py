"""The teacher a student is compared with, shared by `openkd train` and `openkd eval`: whether
its tokenizer gives every token the student's id (`tokenizer`), the pre-flight of a teacher
model before its weights load (`check`), and a teacher behind a vLLM server: its URL, endpoint
and pre-flight (`served`) and the client that scores token sequences on it (`client`)."""
