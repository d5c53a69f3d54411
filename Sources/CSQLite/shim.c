#include "csqlite.h"

int tapio_sqlite_bind_text(sqlite3_stmt *stmt, int index, const char *text, int bytes)
{
	return sqlite3_bind_text(stmt, index, text, bytes, SQLITE_TRANSIENT);
}

int tapio_sqlite_bind_blob(sqlite3_stmt *stmt, int index, const void *data, int bytes)
{
	return sqlite3_bind_blob(stmt, index, data, bytes, SQLITE_TRANSIENT);
}
