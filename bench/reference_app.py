"""The floor for this machine: a bare Flask + psycopg2 app doing the same keyset page and the
same insert as the service, with nothing else (no validation, auth, logging or metrics).

    DB_URI=... gunicorn -w 3 -b 127.0.0.1:5001 bench.reference_app:app
"""

import os

import psycopg2
from flask import Flask, jsonify, request
from sqlalchemy.engine import make_url

app = Flask(__name__)
_connection = None


def _conn():
    global _connection  # one connection per worker process, opened after the fork
    if _connection is None:
        url = make_url(os.environ["DB_URI"])
        _connection = psycopg2.connect(
            dbname=url.database,
            user=url.username,
            password=url.password,
            host=url.query.get("host", url.host),
            port=url.port,
        )
        _connection.autocommit = True
    return _connection


@app.get("/books/")
def list_books():
    with _conn().cursor() as cursor:
        cursor.execute(
            "SELECT id, title, author, owner_id, created_at, updated_at FROM books ORDER BY id DESC LIMIT 21"
        )
        rows = cursor.fetchall()
    items = [
        {
            "id": r[0],
            "title": r[1],
            "author": r[2],
            "owner_id": r[3],
            "created_at": r[4].isoformat(),
            "updated_at": r[5].isoformat(),
        }
        for r in rows[:20]
    ]
    return jsonify(items=items, next_cursor=items[-1]["id"] if len(rows) > 20 else None)


@app.post("/books/")
def create_book():
    with _conn().cursor() as cursor:
        cursor.execute(
            "INSERT INTO books (title, owner_id) VALUES (%s, (SELECT min(id) FROM users)) RETURNING id",
            (request.get_json()["title"],),
        )
        book_id = cursor.fetchone()[0]
    return jsonify(id=book_id), 201


@app.post("/auth/<action>")
def auth(action):
    return jsonify(token="reference"), 200 if action == "login" else 201
