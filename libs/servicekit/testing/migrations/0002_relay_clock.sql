-- applied_at is when the effect row was written (not when its transaction began), so bench/pipe.py can read
-- the time the last message landed off the table instead of polling it hard.
ALTER TABLE relay_effects ALTER COLUMN applied_at SET DEFAULT clock_timestamp();
