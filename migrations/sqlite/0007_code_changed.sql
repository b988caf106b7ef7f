-- When a version's code was last replaced by other code under the same version (a swap): the
-- documents it wrote before stay as that code made them until the version is rebuilt.
ALTER TABLE plugins ADD COLUMN code_changed_at INTEGER;
