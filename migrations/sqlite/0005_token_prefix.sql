-- SQLite compares text bytewise, so the primary key already serves prefix lookups of
-- token hashes; this step keeps both backends' migration histories the same length.
SELECT 1;
