-- The new scores table takes the old one's name, inside the swap's transaction (Store.replace_scores).
ALTER TABLE scores__new RENAME TO scores
