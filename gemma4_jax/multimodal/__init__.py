"""Images and audio in prompts: preprocessing (`preprocess`), and the towers' features placed as soft tokens
(`towers`)."""
