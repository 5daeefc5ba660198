-- Rows of the new scores table before it replaces the old one (each sample exactly once).
SELECT count(*) FROM scores__new
