-- When a version's code was last replaced by other code under the same version (a swap): the
-- documents it wrote before stay as that code made them until the version is rebuilt.
ALTER TABLE __SCHEMA__.plugins ADD COLUMN IF NOT EXISTS code_changed_at bigint;
