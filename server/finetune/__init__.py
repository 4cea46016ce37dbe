"""Fine-tuning inside the server: training files and durable jobs in the store's database
(``store``, ``records``), the worker that trains a user's vectors on the serving model between
engine steps (``worker``), behind the API's access rules and limits (``service``); ``data``
checks and tokenizes training files."""
