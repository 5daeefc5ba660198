-- weights_delete: remove the stored weights of one prompt ($prompt) before writing new ones.
DELETE FROM weights WHERE prompt = $prompt
